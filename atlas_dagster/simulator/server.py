"""The Graph simulator: Microsoft Graph and Entra sign-in over HTTP, in-process or on loopback.

It answers every contract of ``graph_contracts`` the way Graph does — versioned paths, ``$select``
and ``$expand``, server-side page limits with absolute ``@odata.nextLink``, groups delta with
``@removed`` and ``@odata.deltaLink``, ``$batch`` with ``dependsOn`` — and enforces bearer tokens
whose ``roles`` claim must grant each contract's permissions, answering with each service's own
error shape. Writes follow their write contracts (:mod:`.writes`) under Intune's write throttling.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx

from atlas_dagster.simulator.auth import Answer, Authority, b64url, b64url_decode
from atlas_dagster.simulator.faults import FaultPlan
from atlas_dagster.simulator.odata import (
    QueryError,
    Shape,
    parse_expand,
    parse_filter,
    parse_select,
    shape,
)
from atlas_dagster.simulator.tenant import SimulatedTenant
from atlas_dagster.simulator.writes import (
    REFERENCE_OBJECTS,
    WRITE_METHODS,
    WriteLimits,
    WriteRefused,
    apply_write,
)
from graph_contracts import CONTRACTS, Contract, all_permissions, missing_permissions

JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
DEFAULT_SECRET = "simulated-secret"
VERSIONS = ("v1.0", "beta")
# Server-side page limits: Intune lists stop at 100 whatever $top asks; the settings catalog's
# settings sub-collection pages at 25 (clients that assume one page lose settings there).
DEFAULT_PAGE_MAX = 100
PAGE_MAX = {"settings_catalog.settings": 25}
DELTA_PAGE = 100  # directory delta pages without a Prefer header
DELTA_PAGE_MAX = 200  # the most `Prefer: odata.maxpagesize` gets for directory objects
# Members of a group beyond this many arrive on a later delta page, as Graph splits them.
MEMBERS_PER_PAGE = 4
QUERY_OPTIONS = {"$select", "$expand", "$top", "$skiptoken", "$deltatoken", "$filter"}
_TIMEOUT = object()
_BAD_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload "
    "is of valid JSON format."
)
# A route: the contract key, the item id and the id of an element of its nested content.
Route = tuple[str | None, str | None, str | None]


@dataclass
class SimulatorStats:
    """What the simulator was asked. ``total`` counts Graph HTTP requests (a ``$batch``
    envelope is one); ``per_contract`` counts requests and sub-requests by contract key."""

    total: int = 0
    batch_sub_requests: int = 0
    token_requests: int = 0
    login_requests: int = 0
    faults_injected: int = 0
    per_contract: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        self.total = self.batch_sub_requests = self.token_requests = 0
        self.login_requests = self.faults_injected = 0
        self.per_contract = Counter()


@dataclass
class _Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _path_regex(contract: Contract) -> str:
    parts = re.split(r"/\{(?:id|sub_id)\}", contract.path)
    body = "/([^/]+)".join(re.escape(part) for part in parts)
    if contract.paging == "delta":
        body += r"(?:\(\))?"
    return body


class _Router:
    """Maps a method and ``/{version}/path`` to a contract key and ids."""

    def __init__(self) -> None:
        self._routes = [
            (key, c, re.compile(_path_regex(c) + "$", re.IGNORECASE))
            for key, c in CONTRACTS.items()
        ]

    def match(self, version: str, rest: str, method: str = "GET") -> Route:
        """The contract of this method on this path; else the first whose path matches (it
        answers 405)."""
        fallback: Route | None = None
        for key, contract, pattern in self._routes:
            if key != "batch" and contract.api_version != version:
                continue
            found = pattern.match(rest)
            if not found:
                continue
            groups = found.groups()
            route = (key, *(groups + (None, None))[:2])
            if key == "batch" or contract.method == method:
                return route
            fallback = fallback or route
        return fallback or (None, None, None)

    def siblings(self, key: str) -> list[Contract]:
        """The contracts sharing this one's version, method and path (one action can take
        several writes)."""
        own = CONTRACTS[key]
        return [
            c
            for c in CONTRACTS.values()
            if (c.api_version, c.method, c.path) == (own.api_version, own.method, own.path)
        ]


_ROUTER = _Router()


def _entity_set(contract: Contract) -> str:
    return contract.path.lstrip("/").split("/{id}")[0]


def _encode_state(state: dict[str, Any]) -> str:
    return b64url(json.dumps(state, separators=(",", ":")).encode())


def _decode_state(token: str) -> dict[str, Any] | None:
    try:
        state = json.loads(b64url_decode(token))
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


class GraphSimulator:
    """Microsoft Graph and Entra sign-in for one simulated tenant."""

    def __init__(
        self,
        tenant: SimulatedTenant,
        client_secret: str = DEFAULT_SECRET,
        granted_roles: list[str] | None = None,
    ):
        self.tenant = tenant
        # What the in-process client signs in with; a test sets another to see sign-in fail.
        self.client_secret = client_secret
        self.authority = Authority(tenant.tenant_id, tenant.client_id, client_secret)
        self._granted = list(all_permissions() if granted_roles is None else granted_roles)
        self.faults = FaultPlan()
        self.write_limits = WriteLimits()
        # What write throttling measures time with; a test may set its own.
        self.clock: Callable[[], float] = time.monotonic
        self.stats = SimulatorStats()
        self._lock = threading.RLock()
        self._delta_epoch = 0

    # --- control -------------------------------------------------------------------------------

    @property
    def granted_roles(self) -> list[str]:
        return list(self._granted)

    @granted_roles.setter
    def granted_roles(self, roles: list[str]) -> None:
        # A token's roles are fixed when it is issued. A change of consent takes effect at once
        # here: tokens issued so far are revoked, so the next request signs in again and gets
        # a token with the new roles.
        with self._lock:
            if set(roles) != set(self._granted):
                self.authority.revoke_all()
            self._granted = list(roles)

    def register_certificate(self, thumbprint_hex: str, expires_at: float | datetime) -> None:
        """Register a certificate (SHA-1 thumbprint, hex) on the app; msal signs its client
        assertion with the key and names the thumbprint in the ``x5t`` header."""
        when = expires_at.timestamp() if isinstance(expires_at, datetime) else float(expires_at)
        with self._lock:
            self.authority.certificates[thumbprint_hex.replace(":", "").lower()] = when

    def revoke_tokens(self) -> None:
        """Every access token issued so far now answers 401."""
        with self._lock:
            self.authority.revoke_all()

    def expire_delta_tokens(self) -> None:
        """Every delta and skip token issued so far now answers 410 Gone."""
        with self._lock:
            self._delta_epoch += 1

    # --- transport -----------------------------------------------------------------------------

    def transport(self) -> httpx.BaseTransport:
        return _Transport(self)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        latency = self.faults.latency_s
        if latency:
            time.sleep(latency)
        with self._lock, self.tenant.lock:
            reply = self._dispatch(request)
        if reply is _TIMEOUT:
            raise httpx.ReadTimeout("simulated read timeout", request=request)
        assert isinstance(reply, httpx.Response)
        return reply

    @contextlib.contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve on real sockets in a background thread; yields the base URL."""
        server = _make_server(self, host, port)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        try:
            yield f"http://{host}:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, request: httpx.Request) -> httpx.Response | object:
        url = request.url
        segments = url.path.strip("/").split("/")
        request_id = str(uuid.uuid4())
        client_request_id = request.headers.get("client-request-id") or request_id
        ids = (request_id, client_request_id)
        if segments and segments[0] in VERSIONS:
            return self._graph(request, segments[0], "/" + "/".join(segments[1:]), ids)
        answer = self._login(request, segments)
        if answer is not None:
            self.stats.login_requests += 1
            headers = {"Content-Type": "application/json; charset=utf-8", **dict(answer.headers)}
            return httpx.Response(answer.status, headers=headers, json=answer.body)
        return self._respond(
            _Reply(404, self._error("ResourceNotFound", "Resource not found.", ids)), ids
        )

    def _login(self, request: httpx.Request, segments: list[str]) -> Answer | None:
        scheme, host = request.url.scheme, request.url.netloc.decode()
        query = request.url.query.decode()
        if request.method == "GET" and segments == ["common", "discovery", "instance"]:
            return self.authority.instance_discovery(scheme, host, query)
        if (
            request.method == "GET"
            and len(segments) == 4
            and segments[1:] == ["v2.0", ".well-known", "openid-configuration"]
        ):
            return self.authority.openid_configuration(scheme, host, segments[0])
        if (
            request.method == "POST"
            and len(segments) == 4
            and segments[1:] == ["oauth2", "v2.0", "token"]
        ):
            self.stats.token_requests += 1
            form = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
            return self.authority.token(segments[0], form, self._granted)
        return None

    def _graph(
        self, request: httpx.Request, version: str, rest: str, ids: tuple[str, str]
    ) -> httpx.Response | object:
        self.stats.total += 1
        route = _ROUTER.match(version, rest, request.method)
        key = route[0]
        self.stats.per_contract[key or "unmatched"] += 1
        claims, why = self.authority.validate(request.headers.get("Authorization"))
        if claims is None:
            return self._respond(self._unauthorized(why, ids), ids)
        query = request.url.query.decode()
        writes = request.method in WRITE_METHODS and key != "batch"
        fault = self.faults.decide(rest + ("?" + query if query else ""), write=writes)
        if fault is not None:
            self.stats.faults_injected += 1
            if fault == "timeout":
                return _TIMEOUT
            if fault not in ("malformed", "no_next_link", "drop_response"):
                return self._respond(self._fault_reply(fault, ids), ids)
        base = self._link_base(request.url.scheme, request.url.netloc.decode())
        if key == "batch":
            reply = self._batch(request, version, claims, base, ids)
        else:
            try:
                body = json.loads(request.content) if request.content else None
            except ValueError:
                return self._respond(_Reply(400, self._error("BadRequest", _BAD_JSON, ids)), ids)
            reply = self._route(
                route,
                request.method,
                version,
                rest,
                query,
                claims,
                base,
                ids,
                prefer=request.headers.get("Prefer"),
                body=body,
            )
        if fault == "drop_response":
            # The write happened; its answer never arrives.
            return _TIMEOUT
        if fault == "no_next_link" and isinstance(reply.body, dict):
            reply.body.pop("@odata.nextLink", None)
        response = self._respond(reply, ids)
        if fault == "malformed":
            truncated = response.content[: max(len(response.content) // 2, 1)]
            return httpx.Response(200, headers=self._headers(ids), content=truncated)
        return response

    def _link_base(self, scheme: str, host: str) -> str:
        return "https://evil.example.com" if self.faults.foreign_next_link else f"{scheme}://{host}"

    def _route(
        self,
        route: Route,
        method: str,
        version: str,
        rest: str,
        query: str,
        claims: dict[str, Any],
        base: str,
        ids: tuple[str, str],
        prefer: str | None = None,
        body: Any = None,
    ) -> _Reply:
        key, item_id, sub_id = route  # as _ROUTER matched it
        if key is None or key == "batch":
            segment = rest.rstrip("/").rsplit("/", 1)[-1]
            return _Reply(
                404,
                self._error(
                    "BadRequest" if key is None else "ResourceNotFound",
                    f"Resource not found for the segment '{segment}'.",
                    ids,
                ),
            )
        contract = CONTRACTS[key]
        if method != contract.method:
            return _Reply(
                405,
                self._error("BadRequest", f"The HTTP method '{method}' is not supported.", ids),
            )
        missing = missing_permissions(contract.permissions, claims.get("roles") or [])
        if missing:
            return self._forbidden(rest, missing, ids)
        if contract.write is not None:
            return self._write(contract, route, version, rest, claims, base, ids, body)
        params = parse_qsl(query, keep_blank_values=True)
        try:
            options = self._options(contract, params)
            if contract.paging == "delta":
                options["page"] = _delta_page_size(prefer)
                return self._delta(version, rest, options, base, ids)
            if contract.is_item_read and contract.paging == "none":
                return self._item(contract, version, item_id, options, base, ids)
            return self._collection(contract, version, rest, item_id, params, options, base, ids)
        except QueryError as exc:
            return _Reply(400, self._error("BadRequest", str(exc), ids))

    # --- writes --------------------------------------------------------------------------------

    def _write(
        self,
        contract: Contract,
        route: Route,
        version: str,
        rest: str,
        claims: dict[str, Any],
        base: str,
        ids: tuple[str, str],
        body: Any,
    ) -> _Reply:
        if contract.throttle == "intune_write":
            wait = self.write_limits.admit(str(claims.get("appid")), self.clock())
            if wait is not None:
                text = "Too many write requests for this tenant and application."
                return _Reply(
                    429,
                    self._error("TooManyRequests", self._intune_message(text, rest, ids), ids),
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        try:
            written = apply_write(self.tenant, _ROUTER.siblings(contract.key), *route[1:], body)
        except WriteRefused as exc:
            return self._service_error(rest, exc.status, exc.code, exc.message, ids)
        answer = written.body
        if isinstance(answer, dict) and "value" not in answer:
            assert contract.parent is not None
            entity_set = _entity_set(CONTRACTS[contract.parent])
            context = f"{base}/{version}/$metadata#{entity_set}/$entity"
            answer = {"@odata.context": context, **answer}
        return _Reply(written.status, answer)

    # --- query options -------------------------------------------------------------------------

    def _options(self, contract: Contract, params: list[tuple[str, str]]) -> dict[str, Any]:
        values = dict(params)
        unknown = [k for k in values if k.startswith("$") and k not in QUERY_OPTIONS]
        if unknown:
            raise QueryError(f"Query option '{unknown[0]}' is not allowed.")
        expand = parse_expand(values.get("$expand"))
        # Graph's navigation properties belong to the entity, not to one of the calls the
        # contracts model on its path.
        expands = [e for c in _ROUTER.siblings(contract.key) for e in c.expand]
        allowed = parse_expand(",".join(expands)) if expands else {}
        for name in expand:
            if name not in allowed:
                raise QueryError(
                    f"Could not find a navigation property named '{name}' to expand on "
                    f"'{_entity_set(contract)}'."
                )
        top = values.get("$top")
        if top is not None and (not top.isdigit() or int(top) < 1):
            raise QueryError(f"Invalid value '{top}' for $top query option found.")
        return {
            "shape": Shape(parse_select(values.get("$select")), expand),
            "select_text": values.get("$select"),
            "top": int(top) if top else None,
            "skiptoken": values.get("$skiptoken"),
            "deltatoken": values.get("$deltatoken"),
            "filter": parse_filter(values.get("$filter")),
        }

    # --- collections and items -----------------------------------------------------------------

    def _parent_object(self, contract: Contract, item_id: str | None) -> dict[str, Any] | None:
        assert item_id is not None
        if contract.parent is None:
            return REFERENCE_OBJECTS[contract.key].get(item_id)
        return self.tenant.stored_policy(contract.parent, item_id)

    def _collection(
        self,
        contract: Contract,
        version: str,
        rest: str,
        item_id: str | None,
        params: list[tuple[str, str]],
        options: dict[str, Any],
        base: str,
        ids: tuple[str, str],
    ) -> _Reply:
        if contract.is_item_read:
            parent = self._parent_object(contract, item_id)
            if parent is None:
                return self._not_found(rest, item_id, ids)
            source = parent.get(contract.path.rsplit("/", 1)[1]) or []
            context = f"{_entity_set(contract)}('{item_id}')/{contract.path.rsplit('/', 1)[1]}"
        else:
            source = self.tenant.stored_policies(contract.key)
            context = _entity_set(contract)
        if options["filter"] is not None:
            name, value = options["filter"]
            source = [o for o in source if o.get(name) == value]
        limit = PAGE_MAX.get(contract.key, DEFAULT_PAGE_MAX)
        size = min(options["top"] or limit, limit)
        offset = 0
        if options["skiptoken"] is not None:
            state = _decode_state(options["skiptoken"])
            if state is None or not isinstance(state.get("o"), int):
                raise QueryError("The $skiptoken value is not valid.")
            offset = state["o"]
        page = source[offset : offset + size]
        if options["select_text"]:
            context += f"({options['select_text']})"
        body: dict[str, Any] = {
            "@odata.context": f"{base}/{version}/$metadata#{context}",
            "value": [shape(o, options["shape"]) for o in page],
        }
        if offset + size < len(source):
            kept = [(k, v) for k, v in params if k != "$skiptoken"]
            kept.append(("$skiptoken", _encode_state({"o": offset + size})))
            body["@odata.nextLink"] = (
                f"{base}/{version}{rest}?{urlencode(kept, safe='$,()=;', quote_via=quote)}"
            )
        return _Reply(200, body)

    def _item(
        self,
        contract: Contract,
        version: str,
        item_id: str | None,
        options: dict[str, Any],
        base: str,
        ids: tuple[str, str],
    ) -> _Reply:
        stored = self._parent_object(contract, item_id)
        if stored is None:
            return self._not_found(contract.path, item_id, ids)
        body = {
            "@odata.context": f"{base}/{version}/$metadata#{_entity_set(contract)}/$entity",
            **shape(stored, options["shape"], item_read=True),
        }
        return _Reply(200, body)

    # --- groups delta --------------------------------------------------------------------------

    def _delta(
        self, version: str, rest: str, options: dict[str, Any], base: str, ids: tuple[str, str]
    ) -> _Reply:
        token = options["deltatoken"] or options["skiptoken"]
        if token is not None:
            state = _decode_state(token)
            if state is None or state.get("e") != self._delta_epoch:
                return _Reply(
                    410,
                    self._error(
                        "syncStateNotFound",
                        "The sync state generation is not found. The delta token is expired "
                        "and data must be synchronized again.",
                        ids,
                    ),
                )
        else:
            state = {
                "k": "i",
                "p": 0,
                "s": self.tenant.change_sequence,
                "sel": options["select_text"],
                "m": [],
            }
        if state["k"] == "d":  # a deltaLink: changes since its sequence, up to now
            state = {"k": "c", "f": state["s"], "t": self.tenant.change_sequence, "o": 0,
                     "sel": state.get("sel")}  # fmt: skip
        select = parse_select(state.get("sel"))
        with_members = select is not None and "members" in select
        how = Shape(select)
        value: list[dict[str, Any]] = []
        if state["k"] == "i":
            done = self._delta_initial(state, how, with_members, value, options["page"])
            next_seq = state["s"]
        else:
            changed = self.tenant.group_changes_since(state["f"], until=state["t"])
            window = changed[state["o"] : state["o"] + options["page"]]
            for group_id in window:
                reason = self.tenant.deletion_reason(group_id)
                group = self.tenant.group_by_id(group_id)
                if reason is not None or group is None:
                    value.append({"id": group_id, "@removed": {"reason": reason or "deleted"}})
                    continue
                obj = shape(group, how)
                if with_members:
                    obj["members@delta"] = self.tenant.group_members(group_id)
                value.append(obj)
            state["o"] += len(window)
            done = state["o"] >= len(changed)
            next_seq = state["t"]
        context = "groups" + (f"({state['sel']})" if state.get("sel") else "")
        body: dict[str, Any] = {"@odata.context": f"{base}/{version}/$metadata#{context}"}
        link = f"{base}/{version}/groups/delta()"
        if done:
            token_state = {"e": self._delta_epoch, "k": "d", "s": next_seq, "sel": state.get("sel")}
            body["@odata.deltaLink"] = f"{link}?$deltatoken={_encode_state(token_state)}"
        else:
            body["@odata.nextLink"] = (
                f"{link}?$skiptoken={_encode_state(state | {'e': self._delta_epoch})}"
            )
        body["value"] = value
        return _Reply(200, body)

    def _delta_initial(
        self,
        state: dict[str, Any],
        how: Shape,
        with_members: bool,
        value: list[dict[str, Any]],
        page: int,
    ) -> bool:
        """Fill one page of the initial round; True when the round is complete."""
        for group_id in state["m"]:
            if self.tenant.group_by_id(group_id) is not None:
                rest = self.tenant.group_members(group_id)[MEMBERS_PER_PAGE:]
                value.append({"id": group_id, "members@delta": rest})
        pending: list[str] = []
        positions = self.tenant.group_positions
        position = state["p"]
        while len(value) < page and position < positions:
            group_id, group = self.tenant.group_at(position)
            position += 1
            if group is None:
                continue
            obj = shape(group, how)
            if with_members:
                members = self.tenant.group_members(group_id)
                obj["members@delta"] = members[:MEMBERS_PER_PAGE]
                if len(members) > MEMBERS_PER_PAGE:
                    pending.append(group_id)
            value.append(obj)
        state["p"], state["m"] = position, pending
        return position >= positions and not pending

    # --- $batch --------------------------------------------------------------------------------

    def _batch(
        self,
        request: httpx.Request,
        version: str,
        claims: dict[str, Any],
        base: str,
        ids: tuple[str, str],
    ) -> _Reply:
        if request.method != "POST":
            return _Reply(405, self._error("BadRequest", "$batch only accepts POST.", ids))
        try:
            payload = json.loads(request.content or b"null")
            requests = payload["requests"]
            if not isinstance(requests, list):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            return _Reply(400, self._error("BadRequest", "Invalid batch payload format.", ids))
        if len(requests) > 20:
            return _Reply(
                400,
                self._error(
                    "BadRequest", "Number of batch requests exceeds the maximum limit of 20.", ids
                ),
            )
        try:
            order = _batch_order(requests)
        except ValueError as exc:
            return _Reply(400, self._error("BadRequest", str(exc), ids))
        answers: dict[str, dict[str, Any]] = {}
        for sub_id, sub in order:
            failed = [d for d in sub.get("dependsOn") or () if answers[d]["status"] >= 300]
            if failed:
                # Graph runs nothing whose dependency failed.
                error = self._error(
                    "FailedDependency",
                    f"The request depends on request {failed[0]}, which failed.",
                    (str(uuid.uuid4()), str(uuid.uuid4())),
                )
                answers[sub_id] = {
                    "status": 424,
                    "headers": {"Content-Type": JSON_TYPE},
                    "body": error,
                }
            else:
                answers[sub_id] = self._sub_request(sub, version, claims, base)
        responses = [{"id": str(sub["id"]), **answers[str(sub["id"])]} for sub in requests]
        return _Reply(200, {"responses": responses})

    def _sub_request(
        self, sub: dict[str, Any], version: str, claims: dict[str, Any], base: str
    ) -> dict[str, Any]:
        self.stats.batch_sub_requests += 1
        sub_ids = (str(uuid.uuid4()), str(uuid.uuid4()))
        url = str(sub.get("url", ""))
        method = str(sub.get("method", "GET")).upper()
        if "://" in url:
            reply = _Reply(
                400, self._error("BadRequest", "Invalid request URL: it must be relative.", sub_ids)
            )
        else:
            target = url if url.startswith("/") else "/" + url
            rest, _, query = target.partition("?")
            route = _ROUTER.match(version, rest, method)
            self.stats.per_contract[route[0] or "unmatched"] += 1
            fault = self.faults.decide(target, sub_request=True, write=method in WRITE_METHODS)
            if fault is not None:
                self.stats.faults_injected += 1
            if fault is None or fault == "drop_response":
                reply = self._route(
                    route, method, version, rest, query, claims, base, sub_ids, body=sub.get("body")
                )
            if fault is not None:
                # A write whose answer is lost shows, like a timeout, as the gateway's 504.
                kind = "504" if fault in ("timeout", "drop_response") else fault
                reply = self._fault_reply(kind, sub_ids)
        if reply.body is None:
            return {
                "status": reply.status,
                "headers": {"Cache-Control": "no-cache", **reply.headers},
            }
        headers = {"Content-Type": JSON_TYPE, "Cache-Control": "no-cache", **reply.headers}
        return {"status": reply.status, "headers": headers, "body": reply.body}

    # --- replies -------------------------------------------------------------------------------

    def _headers(self, ids: tuple[str, str]) -> dict[str, str]:
        return {
            "Content-Type": JSON_TYPE,
            "Cache-Control": "no-cache",
            "request-id": ids[0],
            "client-request-id": ids[1],
            "x-ms-ags-diagnostic": json.dumps(
                {"ServerInfo": {"DataCenter": "Simulated", "Slice": "E", "Ring": "1"}}
            ),
            "Strict-Transport-Security": "max-age=31536000",
        }

    def _respond(self, reply: _Reply, ids: tuple[str, str]) -> httpx.Response:
        headers = self._headers(ids) | reply.headers
        if reply.body is None:  # 204 No Content, and writes that answer nothing
            del headers["Content-Type"]
            return httpx.Response(reply.status, headers=headers)
        return httpx.Response(reply.status, headers=headers, json=reply.body)

    @staticmethod
    def _error(code: str, message: str, ids: tuple[str, str]) -> dict[str, Any]:
        return {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": _now_text(),
                    "request-id": ids[0],
                    "client-request-id": ids[1],
                },
            }
        }

    def _intune_message(self, text: str, path: str, ids: tuple[str, str]) -> str:
        # Intune wraps its own error document, as a string, inside Graph's error.message.
        url = (
            "https://fef.msub02.manage.microsoft.com/DeviceConfiguration_2405/"
            f"StatelessDeviceConfigurationFEService{path}?api-version=5024-05-02"
        )
        inner = {
            "_version": 3,
            "Message": f"{text} - Operation ID (for customer support): "
            f"00000000-0000-0000-0000-000000000000 - Activity ID: {ids[1]} - Url: {url}",
            "CustomApiErrorPhrase": "",
            "RetryAfter": None,
            "ErrorSourceService": "",
            "HttpHeaders": "{}",
        }
        return json.dumps(inner, indent=2).replace("\n", "\r\n")

    def _forbidden(self, path: str, missing: list[str], ids: tuple[str, str]) -> _Reply:
        if path.lower().startswith(("/devicemanagement", "/deviceappmanagement")):
            scopes = ", ".join(
                dict.fromkeys(
                    name for m in missing for name in (m, m.replace(".Read.", ".ReadWrite."))
                )
            )
            text = (
                "Application is not authorized to perform this operation. Application must have "
                f"one of the following scopes: {scopes}"
            )
            return _Reply(403, self._error("Forbidden", self._intune_message(text, path, ids), ids))
        if path.lower().startswith("/identity/"):
            return _Reply(
                403,
                self._error(
                    "AccessDenied",
                    "You cannot perform the requested operation, required scopes are missing in "
                    "the token.",
                    ids,
                ),
            )
        return _Reply(
            403,
            self._error(
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
                ids,
            ),
        )

    def _not_found(self, path: str, item_id: str | None, ids: tuple[str, str]) -> _Reply:
        text = f"Resource with id '{item_id}' was not found"
        return self._service_error(path, 404, "ResourceNotFound", text, ids)

    def _service_error(
        self, path: str, status: int, code: str, text: str, ids: tuple[str, str]
    ) -> _Reply:
        """An error in the shape of the service behind ``path``: Intune wraps its own."""
        if path.lower().startswith(("/devicemanagement", "/deviceappmanagement")):
            text = self._intune_message(text, path, ids)
        return _Reply(status, self._error(code, text, ids))

    def _unauthorized(self, why: str, ids: tuple[str, str]) -> _Reply:
        return _Reply(
            401,
            self._error("InvalidAuthenticationToken", why, ids),
            {
                "WWW-Authenticate": 'Bearer realm="", authorization_uri='
                '"https://login.microsoftonline.com/common/oauth2/authorize", '
                'client_id="00000003-0000-0000-c000-000000000000"'
            },
        )

    def _fault_reply(self, kind: str, ids: tuple[str, str]) -> _Reply:
        retry = {"Retry-After": self.faults.retry_after}
        if kind == "429":
            return _Reply(
                429,
                self._error(
                    "TooManyRequests",
                    "Too many requests from Identifier:"
                    f"{self.tenant.tenant_id}+{self.tenant.client_id} under category:throttled.",
                    ids,
                ),
                retry,
            )
        if kind == "503":
            return _Reply(
                503,
                self._error("ServiceUnavailable", "The service is temporarily unavailable.", ids),
                retry,
            )
        if kind == "504":
            return _Reply(504, self._error("GatewayTimeout", "The gateway timed out.", ids))
        if kind == "401":
            return self._unauthorized("Lifetime validation failed, the token is expired.", ids)
        return _Reply(
            410,
            self._error(
                "syncStateNotFound",
                "The sync state generation is not found. The delta token is expired and data "
                "must be synchronized again.",
                ids,
            ),
        )


class _Transport(httpx.BaseTransport):
    def __init__(self, simulator: GraphSimulator):
        self.simulator = simulator

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.simulator.handle(request)


def _make_server(simulator: GraphSimulator, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes; with Nagle on, each keep-alive response
        # waits out the client's delayed ACK (~40 ms).
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = [(k, v) for k, v in self.headers.items() if k.lower() != "host"]
            netloc = self.headers.get("Host") or f"{host}:{self.server.server_address[1]}"
            request = httpx.Request(
                self.command, f"http://{netloc}{self.path}", headers=headers, content=body
            )
            try:
                response = simulator.handle(request)
            except httpx.TimeoutException:
                # The client sees its connection drop without an answer.
                self.close_connection = True
                return
            content = response.content
            self.send_response(response.status_code)
            for key, value in response.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "content-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _batch_order(requests: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """The order Graph runs a batch's requests in: each after those its ``dependsOn`` names,
    otherwise as sent. Raises ValueError (a 400 for the whole batch) for duplicate or missing
    ids, a dependency outside the batch or a cycle, and a write without its Content-Type."""
    by_id: dict[str, dict[str, Any]] = {}
    for sub in requests:
        sub_id = str(sub.get("id", "")) if isinstance(sub, dict) else ""
        if not sub_id or sub_id in by_id:
            raise ValueError("Batch request ids must be unique and non-empty.")
        headers = {str(k).lower() for k in sub.get("headers") or {}}
        if "body" in sub and "content-type" not in headers:
            raise ValueError(f"Write request id : {sub_id} does not contain Content-Type header.")
        by_id[sub_id] = sub
    for sub_id, sub in by_id.items():
        depends = sub.get("dependsOn") or []
        if not isinstance(depends, list) or any(str(d) not in by_id for d in depends):
            raise ValueError(f"Request {sub_id} depends on a request that is not in the batch.")
        sub["dependsOn"] = [str(d) for d in depends]
    order: list[tuple[str, dict[str, Any]]] = []
    done: set[str] = set()
    while len(order) < len(by_id):
        ready = next(
            (i for i, sub in by_id.items() if i not in done and set(sub["dependsOn"]) <= done),
            None,
        )
        if ready is None:
            raise ValueError("The dependsOn of the batch's requests form a cycle.")
        done.add(ready)
        order.append((ready, by_id[ready]))
    return order


def _delta_page_size(prefer: str | None) -> int:
    """Graph honours ``Prefer: odata.maxpagesize=N`` on directory delta up to 200 objects."""
    found = re.search(r"odata\.maxpagesize=(\d+)", prefer or "")
    return min(max(int(found.group(1)), 1), DELTA_PAGE_MAX) if found else DELTA_PAGE


def serve_forever(
    host: str = "127.0.0.1", port: int = 8765, profile: str = "small", seed: int = 1
) -> None:
    """Serve a simulated tenant on loopback until interrupted (``atlas-dagster simulator
    serve``)."""
    simulator = GraphSimulator(SimulatedTenant.generate(profile, seed))
    with simulator.serve(host, port) as base_url:
        print(
            f"Graph simulator at {base_url} tenant_id={simulator.tenant.tenant_id} "
            f"client_id={simulator.tenant.client_id} (client secret {DEFAULT_SECRET!r})",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def minimum_request_units(tenant: SimulatedTenant, contract_keys: tuple[str, ...]) -> int:
    """The fewest request units a complete read of these contracts can take from this tenant:
    list pages plus the per-item reads Graph cannot return inline, at the page sizes this server
    applies (a contract's ``$top``, capped by the server's maximum). Benchmarks compare with it."""
    import math

    def pages(contract_key: str, count: int) -> int:
        limit = PAGE_MAX.get(contract_key, DEFAULT_PAGE_MAX)
        size = min(CONTRACTS[contract_key].page_size or limit, limit)
        return max(1, math.ceil(count / size))

    total = 0
    for key in contract_keys:
        contract = CONTRACTS[key]
        objects = tenant.policies(key)
        total += pages(key, len(objects))
        for obj in objects:
            for read in contract.per_item_reads:
                total += (
                    1
                    if read.mode == "merge"
                    else pages(read.contract, len(obj.get(read.key) or []))
                )
    return total
