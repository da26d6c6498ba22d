"""The GraphClient: the one way atlas_dagster talks to Microsoft Graph.

Every request is named by a contract of ``graph_contracts``; the client builds its URL from the
connection's ``graph_base_url``, the contract's API version and path, and refuses to send anything
whose path matches no contract or whose host is not the configured Graph host (so the bearer token
never leaves that host). It pages (``@odata.nextLink``, delta rounds), batches per-item reads with
``$batch`` and maps failures to the ledger's reason codes; signing in is :mod:`.auth`'s, pacing
and retrying :mod:`.transport`'s.

Reads run on several threads at once: the policy contracts of one sync or backup side by side
(:meth:`GraphClient.policy_reads`), and the ``$batch`` requests of one page's per-item reads. A
client never has more than ``concurrency`` requests in flight, and each of them still waits for
the tenant's token bucket, so the budget, not the thread count, sets the pace.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from atlas_dagster import reasons
from atlas_dagster.config import ProviderConnection
from atlas_dagster.graph.auth import EntraAuth, SignIn, decode_jwt_payload, sign_in_for, sign_out
from atlas_dagster.graph.errors import response_error
from atlas_dagster.graph.reads import PolicyReads
from atlas_dagster.graph.transport import (
    CONCURRENCY,
    RETRY_STATUSES,
    GraphStats,
    Ids,
    RetryBudget,
    TokenBucket,
    bucket_for,
    http_client,
)
from atlas_dagster.reasons import GraphError, WriteUncertain
from graph_contracts import BATCH_SIZE, CONTRACTS, Contract

log = logging.getLogger("atlas_dagster.graph")
# Policy contracts read ahead of the caller that writes them, per request the client may have in
# flight: enough that a slow contract (a settings catalog paging its settings) never idles the
# others, few enough that a large tenant is not held in memory all at once.
READ_AHEAD = 2
# Writes that leave the same result however often they are sent (a PATCH, a PUT, an action that
# replaces a collection): safe to send again after a lost answer. Creates and actions that add
# or remove one element are not.
REPEATABLE_EFFECTS = frozenset({"patch", "replace", "set", "merge", "field", "patch_element"})


def path_pattern(contract: Contract) -> re.Pattern[str]:
    """The request path (after the version root) a contract allows; ``{id}`` (and a write's
    ``{sub_id}``) is one segment, never "." or "..". Graph writes delta functions both as
    ``/delta`` and ``/delta()``."""
    parts = [re.escape(p) for p in re.split(r"\{(?:id|sub_id)\}", contract.path)]
    body = r"(?!\.\.?(?:/|$))[^/]+".join(parts)
    if contract.paging == "delta":
        body += r"(?:\(\))?"
    return re.compile(body + "$", re.IGNORECASE)


_PATTERNS = {key: path_pattern(c) for key, c in CONTRACTS.items()}


def batch_contract_for(batch: Contract, contract: Contract) -> Contract:
    """The ``$batch`` contract on the API version of the sub-requests it carries."""
    return replace(batch, api_version=contract.api_version, throttle=contract.throttle)


@dataclass(frozen=True)
class DeltaPage:
    items: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    delta_link: str | None = None


@dataclass
class _Pending:
    """One per-item read in flight through ``$batch``."""

    item_id: str
    url: str  # relative to the version root
    budget: RetryBudget  # of the page being read
    # When it may go again after a Retry-After or backoff (monotonic clock); 0: now.
    not_before: float = 0.0
    collected: list[dict[str, Any]] = field(default_factory=list)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class GraphClient:
    """Reads Microsoft Graph for one provider connection, by contract key only."""

    def __init__(
        self,
        connection: ProviderConnection,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        timeout: float = 30.0,
        bucket: TokenBucket | None = None,
        concurrency: int = CONCURRENCY,
    ):
        if concurrency < 1:
            raise ValueError("a GraphClient needs a concurrency of at least 1")
        self.connection = connection
        self.stats = GraphStats()
        self.concurrency = concurrency
        self._in_flight = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._transport = transport
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._timeout = timeout
        base = urlsplit(connection.graph_base_url)
        self._origin = (base.scheme.lower(), (base.netloc or "").lower())
        self._base_url = connection.graph_base_url.rstrip("/")
        self._base_path = base.path.rstrip("/")
        self._scope = f"{self._base_url}/.default"
        self._tenant_key = f"{base.netloc.lower()}|{connection.tenant_id}"
        self._bucket = bucket
        self._sign_in: SignIn | None = None
        self._client: httpx.Client | None = None

    # -- plumbing ------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = http_client(self._transport, self._timeout)
            return self._client

    def _signed_in(self) -> SignIn:
        with self._lock:
            if self._sign_in is None:
                self._sign_in = sign_in_for(self.connection, self._transport, self._timeout)
            return self._sign_in

    def close(self) -> None:
        """Close this client's connections and the connection's sign-in; a later request opens
        new ones (and signs in again)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._sign_in is not None:
            sign_out(self._sign_in)
            self._sign_in = None

    def _token(self, *, force: bool = False) -> str:
        token, issued = self._signed_in().token(self._scope, force=force)
        if issued:
            self.stats.count(token_requests=1)
        return token

    def token_claims(self) -> dict[str, Any]:
        """The claims of the current access token (signature not checked): ``roles`` lists the
        application permissions Entra granted."""
        return decode_jwt_payload(self._token())

    @staticmethod
    def _contract(contract_key: str) -> Contract:
        try:
            return CONTRACTS[contract_key]
        except KeyError:
            raise ValueError(f"no Graph contract {contract_key!r}") from None

    # -- URLs ----------------------------------------------------------------------------

    def _url(self, contract: Contract, relative: str) -> str:
        return f"{self._base_url}/{contract.api_version}{relative}"

    def _check_url(self, contract: Contract, url: str) -> None:
        """Refuse a URL on another origin, or whose path is not this contract's."""
        parts = urlsplit(url)
        origin = (parts.scheme.lower(), parts.netloc.lower())
        if origin != self._origin:
            raise GraphError(
                reasons.PROVIDER_BAD_RESPONSE,
                f"refusing a link to {parts.scheme}://{parts.hostname} (not the configured "
                "Graph host)",
                contract_key=contract.key,
            )
        path = parts.path
        prefix = f"{self._base_path}/{contract.api_version}"
        rest = path[len(prefix) :] if path.startswith(prefix + "/") else None
        if rest is None or not _PATTERNS[contract.key].match(rest):
            raise GraphError(
                reasons.PROVIDER_BAD_RESPONSE,
                f"refusing a request to {path}: it matches no path of contract {contract.key}",
                contract_key=contract.key,
            )

    def _relative(self, contract: Contract, absolute: str) -> str:
        """A sub-response's absolute nextLink as a ``$batch`` relative URL (after the checks)."""
        self._check_url(contract, absolute)
        parts = urlsplit(absolute)
        rest = parts.path[len(f"{self._base_path}/{contract.api_version}") :]
        return rest + (f"?{parts.query}" if parts.query else "")

    def _check_relative(self, contract: Contract, url: str) -> None:
        if _PATTERNS[contract.key].match(url.split("?", 1)[0]):
            return
        raise GraphError(
            reasons.PROVIDER_BAD_RESPONSE,
            f"refusing a sub-request to {url.split('?', 1)[0]}: it matches no path of "
            f"contract {contract.key}",
            contract_key=contract.key,
        )

    # -- sending -------------------------------------------------------------------------

    def _pace(self, contract: Contract, units: int) -> None:
        bucket = self._bucket or bucket_for(self._tenant_key, contract.throttle)
        delay = bucket.reserve(units)
        if delay > 0:
            self._sleep(delay)

    @staticmethod
    def _headers(contract: Contract) -> dict[str, str]:
        headers = {
            "client-request-id": str(uuid.uuid4()),
            "return-client-request-id": "true",
            "Accept": "application/json",
        }
        if contract.paging == "delta" and contract.page_size:
            # Delta takes no $top; its page size is asked for with a preference.
            headers["Prefer"] = f"odata.maxpagesize={contract.page_size}"
        return headers

    def _answered(self, contract: Contract, units: int, response: httpx.Response) -> Ids:
        """Count and log one response; its request ids."""
        self.stats.count(requests=1, request_units=units)
        ids = {
            "request_id": response.headers.get("request-id"),
            "client_request_id": response.request.headers.get("client-request-id"),
        }
        log.debug(
            "graph %s %s status=%s request-id=%s client-request-id=%s",
            contract.method,
            contract.key,
            response.status_code,
            ids["request_id"],
            ids["client_request_id"],
        )
        return ids

    def _auth(self, contract: Contract, units: int, budget: RetryBudget) -> EntraAuth:
        def before_resend(request: httpx.Request, refused: httpx.Response) -> None:
            # Sending again after a refused token is one more attempt, paced like the others
            # (Graph refused the request before doing anything, so a write may go again too).
            self._answered(contract, units, refused)
            self.stats.count(retries=1)
            budget.attempts += 1
            self._pace(contract, units)
            request.headers["client-request-id"] = str(uuid.uuid4())

        return EntraAuth(self._token, before_resend)

    def _request(
        self, contract: Contract, url: str, *, body: Any = None, units: int = 1
    ) -> dict[str, Any]:
        """Send one request with retries; return its JSON object or raise GraphError.

        A write answers ``{}`` when Graph sends no object (204). A write that is not safe to
        repeat (a create, an action that adds) is retried only after a 429 — Graph did nothing
        then; no answer or a 5xx raises WriteUncertain instead of sending it again."""
        self._check_url(contract, url)
        write = contract.write
        repeatable = write is None or write.effect in REPEATABLE_EFFECTS
        sent = {"requests": 1, "request_units": units, "writes": int(write is not None)}
        budget = RetryBudget(contract.key, self.stats, self._rng)
        auth = self._auth(contract, units, budget)
        while True:
            budget.attempts += 1
            try:
                response = self._send(contract, url, body, units, auth)
            except httpx.TransportError as exc:
                # The request that failed: after a refused token, the resent one.
                client_request_id = exc.request.headers.get("client-request-id")
                log.debug(
                    "graph %s %s failed: %s client-request-id=%s",
                    contract.method,
                    contract.key,
                    type(exc).__name__,
                    client_request_id,
                )
                self.stats.count(**sent)
                if not repeatable:
                    raise WriteUncertain(
                        reasons.RESTORE_OUTCOME_UNKNOWN,
                        f"{contract.key}: no answer ({type(exc).__name__}); not sent again, "
                        "since it may have happened",
                        contract_key=contract.key,
                        client_request_id=client_request_id,
                    ) from None
                self._sleep(budget.broken_wait(type(exc).__name__, client_request_id))
                continue
            ids = self._answered(contract, units, response)
            self.stats.count(writes=sent["writes"])
            status = response.status_code
            if status == 429 or (status in RETRY_STATUSES and repeatable):
                retry_after = response.headers.get("Retry-After")
                self._sleep(budget.status_wait(status, retry_after, f"HTTP {status}", ids))
                continue
            if status >= 500 and not repeatable:
                raise WriteUncertain(
                    reasons.RESTORE_OUTCOME_UNKNOWN,
                    f"{contract.key}: HTTP {status}; not sent again, since it may have happened",
                    contract_key=contract.key,
                    status=status,
                    **ids,
                )
            if status >= 400:
                raise response_error(contract, status, _json_or_none(response), "", ids)
            data = _json_or_none(response)
            if isinstance(data, dict):
                return data
            if write is not None:
                return {}  # it happened: what Graph answered besides does not matter
            self._sleep(budget.malformed_wait(status, ids))

    def _send(
        self, contract: Contract, url: str, body: Any, units: int, auth: EntraAuth
    ) -> httpx.Response:
        """One attempt: paced, and one of the client's ``concurrency`` requests in flight until
        its body is read (waits between attempts hold no place)."""
        with self._in_flight:
            self._pace(contract, units)
            http = self._http()
            request = http.build_request(
                contract.method, url, headers=self._headers(contract), json=body
            )
            response = http.send(request, auth=auth)
            # Read the body now so that a truncated stream fails here, inside the retry.
            response.read()
            return response

    # -- writes ----------------------------------------------------------------------------

    def write(
        self,
        contract_key: str,
        *,
        item_id: str | None = None,
        sub_id: str | None = None,
        body: Any = None,
    ) -> dict[str, Any] | None:
        """Send one write of a write contract, paced by its own budget (Intune's writes have one
        of their own); its answer's JSON object, None when Graph answered without one. See
        :meth:`_request` for what is, and is never, sent again."""
        contract = self._contract(contract_key)
        if contract.write is None:
            raise ValueError(f"{contract_key} is not a write contract")
        url = self._url(contract, contract.write_path(item_id, sub_id))
        return self._request(contract, url, body=body) or None

    def read_object(self, contract_key: str, item_id: str) -> dict[str, Any] | None:
        """One object of a writable policy collection as :meth:`read_policies` assembles it
        (with its details and assignments); None when Graph has no such object."""
        contract = self._contract(contract_key)
        read = self._contract(f"{contract_key}.get")
        try:
            obj = self._request(read, self._url(read, read.relative_url(item_id)))
        except GraphError as exc:
            if exc.status == 404:
                return None
            raise
        obj.pop("@odata.context", None)
        for detail in contract.per_item_reads:
            for _, result in self.read_details(detail.contract, [item_id]):
                if detail.mode == "merge" and isinstance(result, dict):
                    obj.update({k: v for k, v in result.items() if k != "@odata.context"})
                else:
                    obj[detail.key] = result
        return obj

    # -- public reads ----------------------------------------------------------------------

    def pages(
        self, contract_key: str, *, where: str | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream a collection page by page (only the objects ``where``, an OData ``$filter``,
        admits), following ``@odata.nextLink`` verbatim."""
        contract = self._contract(contract_key)
        if contract.paging == "delta":
            raise ValueError(f"{contract_key} is a delta contract; use delta()")
        url: str | None = self._url(contract, contract.relative_url(where=where))
        while url is not None:
            data = self._request(contract, url)
            yield self._page_value(contract, data)
            url = data.get("@odata.nextLink")

    def _page_value(
        self, contract: Contract, data: dict[str, Any], where: str = ""
    ) -> list[dict[str, Any]]:
        value = data.get("value")
        if not isinstance(value, list):
            raise GraphError(
                reasons.PROVIDER_BAD_RESPONSE,
                f"{contract.key}: {where}a page without a 'value' list",
                contract_key=contract.key,
            )
        self.stats.count(pages=1)
        return value

    def probe(self, contract_key: str) -> None:
        """One minimal request confirming the app may read this contract."""
        contract = self._contract(contract_key)
        if contract.is_item_read or contract.method != "GET":
            raise ValueError(f"{contract_key} cannot be probed: it is not a collection read")
        # Only ask for what the contract already shows the endpoint supports.
        query = []
        if contract.select:
            query.append("$select=id")
        if contract.paging == "next_link" and contract.page_size is not None:
            query.append("$top=1")
        relative = contract.path + ("?" + "&".join(query) if query else "")
        self._request(contract, self._url(contract, relative))

    def delta(self, contract_key: str, delta_link: str | None) -> Iterator[DeltaPage]:
        """A delta round: from scratch (``None``) or from a stored deltaLink. The last page
        carries the new deltaLink. Raises DeltaExpired when Graph no longer knows the link."""
        contract = self._contract(contract_key)
        if contract.paging != "delta":
            raise ValueError(f"{contract_key} is not a delta contract")
        url: str | None = delta_link or self._url(contract, contract.relative_url())
        while url is not None:
            data = self._request(contract, url)
            value = self._page_value(contract, data)
            items = [o for o in value if "@removed" not in o]
            removed = [o for o in value if "@removed" in o]
            url = data.get("@odata.nextLink")
            new_link = data.get("@odata.deltaLink")
            if url is None and new_link is None:
                raise GraphError(
                    reasons.PROVIDER_BAD_RESPONSE,
                    f"{contract_key}: a delta page with neither nextLink nor deltaLink",
                    contract_key=contract_key,
                )
            if new_link is not None:
                # Checked now so that a bad link is refused before the caller stores it.
                self._check_url(contract, new_link)
            yield DeltaPage(items, removed, None if url is not None else new_link)

    def read_details(
        self, contract_key: str, ids: Iterable[str], *, lanes: int = 1
    ) -> Iterator[tuple[str, list[dict[str, Any]] | dict[str, Any]]]:
        """Per-item reads through ``$batch``; yields ``(id, result)`` as each item completes.

        A collection contract yields every page's objects as one list (following each
        sub-response's nextLink); an item contract yields the object. Throttled or unavailable
        sub-requests go into a later batch; an item that finally fails raises GraphError.

        Up to ``lanes`` batches are in flight at once, each sent as soon as a lane is free with
        what is queued (one lane: every batch takes up what the one before left to do).
        """
        contract = self._contract(contract_key)
        if not contract.is_item_read:
            raise ValueError(f"{contract_key} is not a per-item contract")
        collection = contract.paging != "none"
        fresh = iter(ids)
        queue: deque[_Pending] = deque()
        exhausted = False
        in_flight: dict[Future[dict[str, Any]], list[_Pending]] = {}
        with ThreadPoolExecutor(lanes, thread_name_prefix="graph-batch") as pool:
            while True:
                while len(in_flight) < lanes:
                    while len(queue) < BATCH_SIZE and not exhausted:
                        item_id = next(fresh, None)
                        if item_id is None:
                            exhausted = True
                            break
                        queue.append(
                            _Pending(
                                item_id, contract.relative_url(item_id), self._budget(contract)
                            )
                        )
                    if not queue:
                        break
                    # Reads that may go now go first: a throttled read waits out its
                    # Retry-After with others that must wait, never holding back the rest.
                    now = time.monotonic()
                    ready = [p for p in queue if p.not_before <= now] or list(queue)
                    chunk = ready[:BATCH_SIZE]
                    for p in chunk:
                        queue.remove(p)
                    for p in chunk:
                        self._check_relative(contract, p.url)
                    in_flight[pool.submit(self._send_batch, contract, chunk)] = chunk
                if not in_flight:
                    return
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                # In the order sent, so that one lane settles exactly as a sequential read would.
                for future in [f for f in in_flight if f in finished]:
                    chunk = in_flight.pop(future)
                    responses = future.result()
                    for n, pending in enumerate(chunk, 1):
                        done = self._settle(contract, pending, responses.get(str(n)), collection)
                        if done is None:
                            queue.append(pending)
                        else:
                            yield pending.item_id, done

    def _send_batch(self, contract: Contract, chunk: list[_Pending]) -> dict[str, dict[str, Any]]:
        """One ``$batch`` request of ``chunk``'s reads, once the last of them may go again (a
        wait that passed while other reads went on is not waited again); its sub-responses by
        id."""
        delay = max(p.not_before for p in chunk) - time.monotonic()
        if delay > 0:
            self._sleep(delay)
        requests = [{"id": str(n), "method": "GET", "url": p.url} for n, p in enumerate(chunk, 1)]
        data = self._request(
            batch_contract_for(CONTRACTS["batch"], contract),
            f"{self._base_url}/{contract.api_version}/$batch",
            body={"requests": requests},
            units=len(chunk),
        )
        return {str(r.get("id")): r for r in data.get("responses") or []}

    def _budget(self, contract: Contract) -> RetryBudget:
        return RetryBudget(contract.key, self.stats, self._rng)

    def _settle(
        self,
        contract: Contract,
        pending: _Pending,
        response: dict[str, Any] | None,
        collection: bool,
    ) -> list[dict[str, Any]] | dict[str, Any] | None:
        """Apply one sub-response: the finished result, or None when the item must go again."""
        pending.budget.attempts += 1
        pending.not_before = 0.0
        status = int(response.get("status", 0)) if response else 0
        headers = {str(k).lower(): v for k, v in ((response or {}).get("headers") or {}).items()}
        body = (response or {}).get("body")
        ids = {
            "request_id": headers.get("request-id"),
            "client_request_id": headers.get("client-request-id"),
        }
        if response is None or status in RETRY_STATUSES:
            pending.not_before = time.monotonic() + pending.budget.status_wait(
                status,
                headers.get("retry-after"),
                f"item {pending.item_id} still HTTP {status or 'missing'}",
                ids,
            )
            return None
        if status >= 400:
            raise response_error(contract, status, body, f"item {pending.item_id}: ", ids)
        if not isinstance(body, dict):
            raise GraphError(
                reasons.PROVIDER_BAD_RESPONSE,
                f"{contract.key}: item {pending.item_id}: the sub-response body is not a JSON "
                "object",
                contract_key=contract.key,
                status=status,
            )
        if not collection:
            return body
        pending.collected.extend(self._page_value(contract, body, f"item {pending.item_id}: "))
        next_link = body.get("@odata.nextLink")
        if next_link is None:
            return pending.collected
        pending.url = self._relative(contract, next_link)
        pending.budget = self._budget(contract)  # a new page has its own retry budget
        return None

    def read_policies(self, contract_key: str) -> Iterator[dict[str, Any]]:
        """A policy contract's complete objects: each listed page enriched with its per-item
        details and assignments (read in batches), yielded object by object."""
        contract = self._contract(contract_key)
        for page in self.pages(contract_key):
            by_id = {str(obj["id"]): obj for obj in page if obj.get("id") is not None}
            for read in contract.per_item_reads:
                try:
                    reads = self.read_details(read.contract, list(by_id), lanes=self.concurrency)
                    for item_id, result in reads:
                        obj = by_id[item_id]
                        if read.mode == "merge" and isinstance(result, dict):
                            obj.update({k: v for k, v in result.items() if k != "@odata.context"})
                        else:
                            obj[read.key] = result
                except GraphError as exc:
                    raise GraphError(
                        exc.reason_code,
                        f"{contract_key}: reading {read.key} failed: {exc.message}",
                        contract_key=contract_key,
                        status=exc.status,
                        request_id=exc.request_id,
                        client_request_id=exc.client_request_id,
                    ) from exc
            yield from page

    def policy_reads(self, contract_keys: Iterable[str]) -> PolicyReads:
        """Every one of these policy contracts read completely (:meth:`read_policies`), up to
        ``concurrency`` of them at once, handed over in the order asked for."""
        return PolicyReads(self, contract_keys, ahead=READ_AHEAD * self.concurrency)
