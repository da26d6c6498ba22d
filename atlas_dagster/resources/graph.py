"""The GraphClient: the one way atlas_dagster talks to Microsoft Graph (DESIGN §4).

Every request is named by a contract of ``graph_contracts``; the client builds its URL from the
connection's ``graph_base_url``, the contract's API version and path, and refuses to send anything
whose path matches no contract or whose host is not the configured Graph host (so the bearer token
never leaves that host). It signs in with msal, retries throttling and transient failures, paces
each tenant with a token bucket, batches per-item reads with ``$batch``, and maps failures to the
ledger's reason codes.

Process-level state (one session per connection and transport: the httpx client, the msal app and
its token cache; one token bucket per tenant) lives in module registries so that Dagster, which
builds resources on every sensor tick, never pays for sign-in twice.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import httpx
import msal

from atlas_dagster import reasons
from atlas_dagster.config import ProviderConnection, Secret
from atlas_dagster.reasons import DeltaExpired, GraphError
from atlas_dagster.resources.graph_auth import (
    MsalHttpClient,
    auth_error,
    build_app,
    decode_jwt_payload,
)
from graph_contracts import BATCH_SIZE, CONTRACTS, THROTTLE_BUDGETS, Contract

log = logging.getLogger("atlas_dagster.graph")


class _DropQueries(logging.Filter):
    """httpx logs every request URL at INFO; Graph's skip and delta tokens live in the query,
    so the query is cut before the line reaches any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], httpx.URL):
            record.args = (args[0], args[1].copy_with(query=None), *args[2:])
        return True


if not any(isinstance(f, _DropQueries) for f in logging.getLogger("httpx").filters):
    logging.getLogger("httpx").addFilter(_DropQueries())

# 502 is a gateway's blip (often with an HTML page for a body), as transient as 503 and 504.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_ATTEMPTS = 8  # per request, for throttling and 5xx
MAX_TRANSIENT = 3  # timeouts, transport errors, malformed bodies
MAX_RETRY_AFTER = 300.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# The default budget (Intune: 1000 requests per 20 s per tenant); the burst equals the limit so a
# tenant needing fewer requests than that is never slowed down.
BUCKET_CAPACITY, BUCKET_REFILL_PER_SECOND = THROTTLE_BUDGETS["intune"]


# --- Stats and results ------------------------------------------------------------------------


@dataclass
class GraphStats:
    """Counters for one GraphClient.

    ``requests`` counts HTTP requests sent to Graph (a ``$batch`` envelope is one);
    ``request_units`` counts what Graph's limits count: plain requests plus ``$batch``
    sub-requests, without the envelope. ``retries`` counts every retried request or
    sub-request; ``throttled_retries`` the subset retried because of a 429.
    """

    requests: int = 0
    request_units: int = 0
    throttled_retries: int = 0
    retries: int = 0
    pages: int = 0
    token_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was counted after ``before`` (an earlier ``as_dict()``)."""
        return {k: v - before.get(k, 0) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class DeltaPage:
    items: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    delta_link: str | None = None


# --- Pure helpers --------------------------------------------------------------------------


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds (possibly fractional) or an
    HTTP-date. None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter (between half and all of the capped exponential)."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + rng.random() * ceiling / 2


def path_pattern(contract: Contract) -> re.Pattern[str]:
    """The request path (after the version root) a contract allows; ``{id}`` is one segment,
    never "." or "..". Graph writes delta functions both as ``/delta`` and ``/delta()``."""
    parts = [re.escape(p) for p in contract.path.split("{id}")]
    body = r"(?!\.\.?(?:/|$))[^/]+".join(parts)
    if contract.paging == "delta":
        body += r"(?:\(\))?"
    return re.compile(body + "$", re.IGNORECASE)


_PATTERNS = {key: path_pattern(c) for key, c in CONTRACTS.items()}


def matching_contracts(version_path: str) -> list[str]:
    """Contract keys whose template matches ``/{version}/path`` (query ignored)."""
    version, _, rest = version_path.lstrip("/").partition("/")
    return [
        key
        for key, c in CONTRACTS.items()
        if c.api_version == version and _PATTERNS[key].match("/" + rest)
    ]


def _text(value: Any) -> str:
    return " ".join(str(value).split())


def parse_error_body(body: Any) -> tuple[str | None, str]:
    """Graph's error code and the innermost human message.

    Directory APIs answer ``{"error": {"code": "Authorization_RequestDenied", "message": ...}}``;
    Intune nests a JSON document (sometimes twice) in ``error.message`` whose ``Message`` holds
    the text.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code")
    message: Any = error.get("message") or ""
    for _ in range(4):  # unwrap nested JSON documents
        if not isinstance(message, str) or not message.lstrip().startswith("{"):
            break
        try:
            inner = json.loads(message)
        except ValueError:
            break
        if not isinstance(inner, dict):
            break
        if code in (None, "UnknownError") and isinstance(inner.get("ErrorCode"), str):
            code = inner["ErrorCode"]
        message = inner.get("Message", inner.get("message", ""))
    # Intune appends support ids and its internal service URL; they only lengthen the ledger.
    return (str(code) if code else None), _INTUNE_TAIL.sub("", _text(message))


_INTUNE_TAIL = re.compile(r"\s+-\s+Operation ID \(for customer support\).*$")


_SCOPE_PHRASE = re.compile(
    r"(?:following scopes?|missing permission scopes?|required scopes?)\s*:?\s*([^-]*)",
    re.IGNORECASE,
)
_SCOPE_NAME = re.compile(r"[A-Za-z]+(?:\.[A-Za-z]+)+")


def missing_scopes(message: str) -> list[str]:
    """Permission names that a 403 message says are required, in order."""
    match = _SCOPE_PHRASE.search(message)
    if not match:
        return []
    return list(dict.fromkeys(_SCOPE_NAME.findall(match.group(1))))


def classify_error(status: int, body: Any, required: tuple[str, ...] = ()) -> tuple[str, str]:
    """The reason code and a one-line message for a failed (non-retryable) Graph response. A 403
    that names no permission is explained by ``required``, the contract's own."""
    code, message = parse_error_body(body)
    described = f"{code}: {message}" if code and message else (code or message or "no details")
    if status == 403:
        lowered = f"{code} {message}".lower()
        if "consent" in lowered or "AADSTS65001" in message:
            return reasons.PROVIDER_CONSENT_MISSING, described
        scopes = missing_scopes(message)
        if scopes:
            return (
                reasons.PROVIDER_PERMISSION_DENIED,
                f"missing permission (needs one of: {', '.join(scopes)}); {described}",
            )
        if required:
            described = f"missing permission (requires {', '.join(required)}); {described}"
        return reasons.PROVIDER_PERMISSION_DENIED, described
    if status == 401:
        return reasons.PROVIDER_AUTH_FAILED, described
    if status in (404, 410):
        return reasons.PROVIDER_NOT_FOUND, described
    if status >= 500:
        return reasons.PROVIDER_UNAVAILABLE, described
    return reasons.PROVIDER_BAD_RESPONSE, described


_DELTA_EXPIRED_CODES = frozenset(
    {"syncstatenotfound", "syncstateinvalid", "resyncrequired", "expiredtoken"}
)


def is_delta_expired(status: int, body: Any) -> bool:
    """Graph answers 410 Gone to a delta token it no longer keeps (some services say so with a
    400 and a resync error code instead)."""
    if status == 410:
        return True
    code, _ = parse_error_body(body)
    return status == 400 and (code or "").lower() in _DELTA_EXPIRED_CODES


# --- Pacing -----------------------------------------------------------------------------------


class TokenBucket:
    """A token bucket that reserves capacity: ``reserve(n)`` takes ``n`` units now (going into
    debt if need be) and returns how long the caller must wait before sending."""

    def __init__(
        self,
        capacity: float = BUCKET_CAPACITY,
        refill_per_second: float = BUCKET_REFILL_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    def reserve(self, units: int = 1) -> float:
        with self._lock:
            now = self._clock()
            elapsed = max(now - self._stamp, 0.0)
            self._tokens = min(self.capacity, self._tokens + elapsed * self.refill_per_second)
            self._stamp = now
            self._tokens -= units
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self.refill_per_second


_registry_lock = threading.Lock()
_buckets: dict[str, TokenBucket] = {}


def bucket_for(tenant: str, family: str) -> TokenBucket:
    """The process's bucket for one tenant and one of Graph's throttling budgets."""
    with _registry_lock:
        bucket = _buckets.get(f"{tenant}|{family}")
        if bucket is None:
            capacity, refill = THROTTLE_BUDGETS[family]
            bucket = _buckets[f"{tenant}|{family}"] = TokenBucket(capacity, refill)
        return bucket


# --- Sessions (process level) -----------------------------------------------------------------


class _Session:
    """The httpx client and msal app of one connection (and transport)."""

    def __init__(
        self, connection: ProviderConnection, transport: httpx.BaseTransport | None, timeout: float
    ):
        self.connection = connection
        self.http = httpx.Client(transport=transport, timeout=timeout, follow_redirects=False)
        self.msal_http = MsalHttpClient(self.http, connection.login_base_url)
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()

    def app(self) -> msal.ConfidentialClientApplication:
        # Building the app runs OIDC discovery (network), so it waits until a token is needed.
        with self._lock:
            if self._app is None:
                self._app = build_app(self.connection, self.msal_http)
            return self._app

    def close(self) -> None:
        self.http.close()


_sessions: dict[tuple[ProviderConnection, int], tuple[_Session, Any]] = {}


def _session_for(
    connection: ProviderConnection, transport: httpx.BaseTransport | None, timeout: float
) -> _Session:
    # Keyed by the transport's identity too: two tests (or a simulator restart) with the same
    # connection but different transports must not share a client. The transport itself is kept
    # alongside so its id cannot be reused while the entry lives.
    key = (connection, id(transport))
    with _registry_lock:
        entry = _sessions.get(key)
        if entry is None:
            entry = _sessions[key] = (_Session(connection, transport, timeout), transport)
        return entry[0]


def _drop_session(session: _Session) -> None:
    with _registry_lock:
        for key, (s, _) in list(_sessions.items()):
            if s is session:
                del _sessions[key]
    session.close()


# --- The client -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """One per-item read in flight through ``$batch``."""

    item_id: str
    url: str  # relative to the version root
    attempts: int = 0
    delay: float = 0.0
    collected: list[dict[str, Any]] = field(default_factory=list)


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
    ):
        self.connection = connection
        self.stats = GraphStats()
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
        self._session: _Session | None = None

    # -- plumbing ------------------------------------------------------------------------

    def _sess(self) -> _Session:
        if self._session is None:
            self._session = _session_for(self.connection, self._transport, self._timeout)
        return self._session

    def close(self) -> None:
        """Close the process-level session of this connection; a later request opens a new
        one (and signs in again)."""
        if self._session is not None:
            _drop_session(self._session)
            self._session = None

    def _token(self, *, force: bool = False) -> str:
        session = self._sess()
        try:
            app = session.app()
            if force:
                # acquire_token_for_client would hand back its cached token; Graph rejected it.
                cache = app.token_cache
                for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                    cache.remove_at(entry)
            result = app.acquire_token_for_client(scopes=[self._scope])
        except httpx.HTTPError as exc:
            raise GraphError(
                reasons.PROVIDER_UNAVAILABLE,
                f"token request for tenant {self.connection.tenant_id} failed: "
                f"{type(exc).__name__}",
            ) from None
        except msal.exceptions.MsalServiceError as exc:
            raise GraphError(
                reasons.PROVIDER_UNAVAILABLE,
                f"token endpoint of tenant {self.connection.tenant_id} failed: "
                f"{_text(exc.args[0] if exc.args else type(exc).__name__)[:200]}",
            ) from None
        if not result or "access_token" not in result:
            raise auth_error(result or {}, self.connection.tenant_id)
        if result.get("token_source") == "identity_provider":
            self.stats.token_requests += 1
        return result["access_token"]

    def token_claims(self) -> dict[str, Any]:
        """The claims of the current access token (signature not checked): ``roles`` lists the
        application permissions Entra granted."""
        return decode_jwt_payload(self._token())

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

    def _pace(self, contract: Contract, units: int) -> None:
        bucket = self._bucket or bucket_for(self._tenant_key, contract.throttle)
        wait = bucket.reserve(units)
        if wait > 0:
            self._sleep(wait)

    def _request(
        self, contract: Contract, url: str, *, body: Any = None, units: int = 1
    ) -> dict[str, Any]:
        """Send one request with retries; return its JSON object or raise GraphError."""
        self._check_url(contract, url)
        method = contract.method
        attempt = transient = 0
        refreshed = force_token = False
        while True:
            attempt += 1
            self._pace(contract, units)
            token = self._token(force=force_token)
            force_token = False
            client_request_id = str(uuid.uuid4())
            headers = {
                "Authorization": f"Bearer {token}",
                "client-request-id": client_request_id,
                "return-client-request-id": "true",
                "Accept": "application/json",
            }
            if contract.paging == "delta" and contract.page_size:
                # Delta takes no $top; its page size is asked for with a preference.
                headers["Prefer"] = f"odata.maxpagesize={contract.page_size}"
            try:
                response = self._sess().http.request(method, url, headers=headers, json=body)
                # Read the body now so that a truncated stream fails here, inside the retry.
                response.read()
            except httpx.TransportError as exc:
                log.debug(
                    "graph %s %s failed: %s client-request-id=%s",
                    method,
                    contract.key,
                    type(exc).__name__,
                    client_request_id,
                )
                self.stats.requests += 1
                self.stats.request_units += units
                transient += 1
                if transient >= MAX_TRANSIENT or attempt >= MAX_ATTEMPTS:
                    raise GraphError(
                        reasons.PROVIDER_UNAVAILABLE,
                        f"{contract.key}: {type(exc).__name__} after {attempt} attempts",
                        contract_key=contract.key,
                        client_request_id=client_request_id,
                    ) from None
                self.stats.retries += 1
                self._sleep(backoff_seconds(attempt, self._rng))
                continue
            self.stats.requests += 1
            self.stats.request_units += units
            status = response.status_code
            request_id = response.headers.get("request-id")
            log.debug(
                "graph %s %s status=%s request-id=%s client-request-id=%s",
                method,
                contract.key,
                status,
                request_id,
                client_request_id,
            )
            ids = {"request_id": request_id, "client_request_id": client_request_id}
            if status in RETRY_STATUSES:
                retry_after = response.headers.get("Retry-After")
                self._sleep(
                    self._retry_delay(contract, status, attempt, retry_after, f"HTTP {status}", ids)
                )
                continue
            if status == 401 and not refreshed:
                refreshed = force_token = True
                self.stats.retries += 1
                continue
            if status >= 400:
                try:
                    failed_body = response.json()
                except ValueError:
                    failed_body = None
                raise self._failure(contract, status, failed_body, "", ids)
            try:
                data = response.json()
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                transient += 1
                if transient >= MAX_TRANSIENT:
                    raise GraphError(
                        reasons.PROVIDER_BAD_RESPONSE,
                        f"{contract.key}: the response body is not a JSON object "
                        f"({attempt} attempts)",
                        contract_key=contract.key,
                        status=status,
                        **ids,
                    ) from None
                self.stats.retries += 1
                self._sleep(backoff_seconds(attempt, self._rng))
                continue
            return data

    def _retry_delay(
        self,
        contract: Contract,
        status: int,
        attempts: int,
        retry_after: str | None,
        failing: str,
        ids: dict[str, Any],
    ) -> float:
        """The wait before retrying a 429/502/503/504 (its Retry-After, else jittered backoff),
        counted as a retry; a GraphError once the attempts are spent."""
        if attempts >= MAX_ATTEMPTS:
            raise GraphError(
                reasons.PROVIDER_THROTTLED if status == 429 else reasons.PROVIDER_UNAVAILABLE,
                f"{contract.key}: {failing} after {attempts} attempts",
                contract_key=contract.key,
                status=status or None,
                **ids,
            )
        self.stats.retries += 1
        if status == 429:
            self.stats.throttled_retries += 1
        delay = retry_after_seconds(retry_after)
        return delay if delay is not None else backoff_seconds(attempts, self._rng)

    @staticmethod
    def _failure(
        contract: Contract, status: int, body: Any, where: str, ids: dict[str, Any]
    ) -> GraphError:
        """The GraphError of a failed response or sub-response (``where`` names the item)."""
        kw = {"contract_key": contract.key, "status": status, **ids}
        if contract.paging == "delta" and is_delta_expired(status, body):
            _, message = parse_error_body(body)
            return DeltaExpired(
                reasons.PROVIDER_NOT_FOUND,
                f"{contract.key}: the delta link expired (HTTP {status}); a full resync is "
                f"needed{': ' + message if message else ''}",
                **kw,
            )
        reason, message = classify_error(status, body, contract.permissions)
        return GraphError(reason, f"{contract.key}: {where}HTTP {status}: {message}", **kw)

    @staticmethod
    def _contract(contract_key: str) -> Contract:
        try:
            return CONTRACTS[contract_key]
        except KeyError:
            raise ValueError(f"no Graph contract {contract_key!r}") from None

    # -- public reads ----------------------------------------------------------------------

    def pages(self, contract_key: str) -> Iterator[list[dict[str, Any]]]:
        """Stream a collection page by page, following ``@odata.nextLink`` verbatim."""
        contract = self._contract(contract_key)
        if contract.paging == "delta":
            raise ValueError(f"{contract_key} is a delta contract; use delta()")
        url: str | None = self._url(contract, contract.relative_url())
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
        self.stats.pages += 1
        return value

    def get(self, contract_key: str, *, item_id: str | None = None) -> dict[str, Any]:
        contract = self._contract(contract_key)
        return self._request(contract, self._url(contract, contract.relative_url(item_id)))

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
        self, contract_key: str, ids: Iterable[str]
    ) -> Iterator[tuple[str, list[dict[str, Any]] | dict[str, Any]]]:
        """Per-item reads through ``$batch``; yields ``(id, result)`` as each item completes.

        A collection contract yields every page's objects as one list (following each
        sub-response's nextLink); an item contract yields the object. Throttled or unavailable
        sub-requests go into a later batch; an item that finally fails raises GraphError.
        """
        contract = self._contract(contract_key)
        if not contract.is_item_read:
            raise ValueError(f"{contract_key} is not a per-item contract")
        collection = contract.paging != "none"
        batch_contract = CONTRACTS["batch"]
        batch_url = f"{self._base_url}/{contract.api_version}/$batch"
        fresh = iter(ids)
        queue: deque[_Pending] = deque()
        exhausted = False
        while True:
            while len(queue) < BATCH_SIZE and not exhausted:
                item_id = next(fresh, None)
                if item_id is None:
                    exhausted = True
                    break
                queue.append(_Pending(item_id, contract.relative_url(item_id)))
            if not queue:
                return
            chunk = [queue.popleft() for _ in range(min(BATCH_SIZE, len(queue)))]
            wait = max(p.delay for p in chunk)
            if wait > 0:
                self._sleep(wait)
            for p in chunk:
                self._check_relative(contract, p.url)
            requests = [
                {"id": str(n), "method": "GET", "url": p.url} for n, p in enumerate(chunk, 1)
            ]
            data = self._request(
                batch_contract_for(batch_contract, contract),
                batch_url,
                body={"requests": requests},
                units=len(chunk),
            )
            responses = {str(r.get("id")): r for r in data.get("responses") or []}
            for n, pending in enumerate(chunk, 1):
                done = self._settle(contract, pending, responses.get(str(n)), collection)
                if done is None:
                    queue.append(pending)
                else:
                    yield pending.item_id, done

    def _check_relative(self, contract: Contract, url: str) -> None:
        if _PATTERNS[contract.key].match(url.split("?", 1)[0]):
            return
        raise GraphError(
            reasons.PROVIDER_BAD_RESPONSE,
            f"refusing a sub-request to {url.split('?', 1)[0]}: it matches no path of "
            f"contract {contract.key}",
            contract_key=contract.key,
        )

    def _settle(
        self,
        contract: Contract,
        pending: _Pending,
        response: dict[str, Any] | None,
        collection: bool,
    ) -> list[dict[str, Any]] | dict[str, Any] | None:
        """Apply one sub-response: the finished result, or None when the item must go again."""
        pending.attempts += 1
        pending.delay = 0.0
        status = int(response.get("status", 0)) if response else 0
        headers = {str(k).lower(): v for k, v in ((response or {}).get("headers") or {}).items()}
        body = (response or {}).get("body")
        retryable = response is None or status in RETRY_STATUSES
        ids = {
            "request_id": headers.get("request-id"),
            "client_request_id": headers.get("client-request-id"),
        }
        if retryable:
            pending.delay = self._retry_delay(
                contract,
                status,
                pending.attempts,
                headers.get("retry-after"),
                f"item {pending.item_id} still HTTP {status or 'missing'}",
                ids,
            )
            return None
        if status >= 400:
            raise self._failure(contract, status, body, f"item {pending.item_id}: ", ids)
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
        pending.attempts = 0  # a new page has its own retry budget
        return None

    def read_policies(self, contract_key: str) -> Iterator[dict[str, Any]]:
        """A policy contract's complete objects: each listed page enriched with its per-item
        details and assignments (read in batches), yielded object by object."""
        contract = self._contract(contract_key)
        for page in self.pages(contract_key):
            by_id = {str(obj["id"]): obj for obj in page if obj.get("id") is not None}
            for read in contract.per_item_reads:
                try:
                    for item_id, result in self.read_details(read.contract, list(by_id)):
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


def batch_contract_for(batch: Contract, contract: Contract) -> Contract:
    """The ``$batch`` contract on the API version of the sub-requests it carries."""
    return replace(batch, api_version=contract.api_version, throttle=contract.throttle)


# --- Process-level clients and the Dagster resource -------------------------------------------

_clients: dict[ProviderConnection, tuple[object, GraphClient]] = {}


def client_for(connection: ProviderConnection) -> GraphClient:
    """The process's GraphClient for a connection. A simulated connection is served in-process
    by the simulator registered under its key, signing in as that simulated tenant's app; the
    client follows the registry when a test installs another simulator for the key."""
    sim = None
    if connection.simulated is not None:
        from atlas_dagster.simulator import simulator_for

        sim = simulator_for(connection.key, connection.simulated.profile, connection.simulated.seed)
    with _registry_lock:
        cached = _clients.get(connection)
    if cached is not None and cached[0] is sim:
        return cached[1]
    transport = None
    effective = connection
    if sim is not None:
        transport = sim.transport()
        tenant = sim.tenant
        effective = replace(
            connection,
            tenant_id=tenant.tenant_id,
            client_id=tenant.client_id,
            client_secret=Secret(sim.client_secret),
            certificate=None,
        )
    client = GraphClient(effective, transport=transport)
    with _registry_lock:
        _clients[connection] = (sim, client)
    return client


class GraphClientResource(dg.ConfigurableResource):
    """Hands out the process-level GraphClient of a connection; building it costs nothing."""

    def client(self, connection: ProviderConnection) -> GraphClient:
        return client_for(connection)
