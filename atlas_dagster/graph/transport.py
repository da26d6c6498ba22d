"""What every Graph request goes through below the contracts: the httpx client it is sent with,
the per-tenant token bucket that paces it, and the retry budget that decides whether and after
how long a failed attempt is sent again (429/502/503/504 after their ``Retry-After``, timeouts,
broken connections and malformed bodies after a jittered backoff), counted in :class:`GraphStats`.
A client's requests may be sent from several threads at once (at most ``CONCURRENCY``): the
bucket and the counters take locks.

The client plugs a transport of its own (a test's ``httpx.MockTransport``, the simulator's) in
under these layers; without one, httpx's network transport is used.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import httpx

from atlas_dagster import reasons
from atlas_dagster.reasons import GraphError
from graph_contracts import THROTTLE_BUDGETS

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
# Requests one client has in flight at once. A ~500-policy tenant takes ~45 round trips, most of
# them independent: eight hide a distant tenant's latency, and are few enough that a full read
# is spread over its budget rather than sent all at once (the bucket still paces every one).
CONCURRENCY = 8


@dataclass
class GraphStats:
    """Counters for one GraphClient, counted through :meth:`count` (the client's threads share
    them).

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
    # Write requests answered (each one also counts in requests and request_units).
    writes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, **added: int) -> None:
        with self._lock:
            for name, n in added.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was counted after ``before`` (an earlier ``as_dict()``)."""
        return {k: v - before.get(k, 0) for k, v in self.as_dict().items()}


# --- Retries ----------------------------------------------------------------------------------


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


Ids = dict[str, str | None]


class RetryBudget:
    """The attempts of one request, or of one page of a ``$batch`` sub-request: at most
    MAX_ATTEMPTS in all, and MAX_TRANSIENT timeouts, broken connections or malformed bodies
    among them. The caller counts each attempt in ``attempts``; every ``*_wait`` either counts
    a retry and returns how long to wait before it, or raises the GraphError of a spent budget.
    """

    def __init__(self, contract_key: str, stats: GraphStats, rng: random.Random):
        self.contract_key = contract_key
        self.attempts = 0
        self.transient = 0
        self._stats = stats
        self._rng = rng

    def _retry(self) -> float:
        self._stats.count(retries=1)
        return backoff_seconds(self.attempts, self._rng)

    def status_wait(self, status: int, retry_after: str | None, failing: str, ids: Ids) -> float:
        """After a 429/502/503/504 (status 0: a sub-response ``$batch`` left out): its
        Retry-After, else the backoff. ``failing`` says what failed, for the final error."""
        if self.attempts >= MAX_ATTEMPTS:
            raise GraphError(
                reasons.PROVIDER_THROTTLED if status == 429 else reasons.PROVIDER_UNAVAILABLE,
                f"{self.contract_key}: {failing} after {self.attempts} attempts",
                contract_key=self.contract_key,
                status=status or None,
                **ids,
            )
        self._stats.count(retries=1, throttled_retries=int(status == 429))
        delay = retry_after_seconds(retry_after)
        return delay if delay is not None else backoff_seconds(self.attempts, self._rng)

    def broken_wait(self, error: str, client_request_id: str | None) -> float:
        """After a timeout or a broken connection (``error`` names the exception type)."""
        self.transient += 1
        if self.transient >= MAX_TRANSIENT or self.attempts >= MAX_ATTEMPTS:
            raise GraphError(
                reasons.PROVIDER_UNAVAILABLE,
                f"{self.contract_key}: {error} after {self.attempts} attempts",
                contract_key=self.contract_key,
                client_request_id=client_request_id,
            ) from None
        return self._retry()

    def malformed_wait(self, status: int, ids: Ids) -> float:
        """After a success whose body is not a JSON object (a truncated or foreign page)."""
        self.transient += 1
        if self.transient >= MAX_TRANSIENT:
            raise GraphError(
                reasons.PROVIDER_BAD_RESPONSE,
                f"{self.contract_key}: the response body is not a JSON object "
                f"({self.attempts} attempts)",
                contract_key=self.contract_key,
                status=status,
                **ids,
            ) from None
        return self._retry()


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


# Graph's limits are per tenant, not per client: every client of this process that reads one
# tenant draws from the same bucket, whichever connection or run it serves.
_buckets: dict[tuple[str, str], TokenBucket] = {}
_buckets_lock = threading.Lock()


def bucket_for(tenant: str, family: str) -> TokenBucket:
    """The process's bucket for one tenant and one of Graph's throttling budgets."""
    with _buckets_lock:
        bucket = _buckets.get((tenant, family))
        if bucket is None:
            capacity, refill = THROTTLE_BUDGETS[family]
            bucket = _buckets[(tenant, family)] = TokenBucket(capacity, refill)
        return bucket


# --- The httpx client -------------------------------------------------------------------------


class _DropQueries(logging.Filter):
    """httpx logs every request URL at INFO; Graph's skip and delta tokens live in the query,
    so the query is cut before the line reaches any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], httpx.URL):
            record.args = (args[0], args[1].copy_with(query=None), *args[2:])
        return True


_filter_lock = threading.Lock()


def _drop_queries_from_httpx_logs() -> None:
    httpx_log = logging.getLogger("httpx")
    with _filter_lock:
        if not any(isinstance(f, _DropQueries) for f in httpx_log.filters):
            httpx_log.addFilter(_DropQueries())


def http_client(transport: httpx.BaseTransport | None, timeout: float) -> httpx.Client:
    """The httpx client Graph and Entra requests are sent with (over ``transport``, else the
    network). Redirects are not followed: every URL sent is one the client checked."""
    _drop_queries_from_httpx_logs()
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=False)
