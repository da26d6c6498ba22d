"""Policy contracts read side by side on a client's threads, handed to one caller in order.

The caller (an asset) writes what it is handed from its own thread, in contract order; the
workers only read, each request paced by the tenant's bucket through the client.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from atlas_dagster.reasons import FATAL_FOR_ALL_TYPES, GraphError

if TYPE_CHECKING:
    from atlas_dagster.graph.client import GraphClient


@dataclass
class PolicyRead:
    """One policy contract as far as its read got: the objects in the order Graph listed them,
    and the error that ended the read early, if one did."""

    contract_key: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    error: GraphError | None = None

    def replay(self) -> Iterator[dict[str, Any]]:
        """The objects as :meth:`GraphClient.read_policies` yielded them, then its error."""
        yield from self.objects
        if self.error is not None:
            raise self.error


class PolicyReads:
    """Policy contracts read side by side on the client's threads, for one caller that takes
    them in order (and writes them from its own thread):

        with client.policy_reads(keys) as reads:
            for read in reads:
                ...

    At most ``ahead`` contracts are read or held that the caller has not taken yet, so a slow
    writer holds a bounded part of the tenant in memory. A contract's GraphError ends only its
    own read, unless no contract can escape it (sign-in, consent): then every read not yet
    started ends with that error too, without a request. Leaving the block cancels the reads not
    started and stops the running ones after their current page."""

    def __init__(self, client: GraphClient, contract_keys: Iterable[str], ahead: int):
        self._client = client
        self._keys = deque(contract_keys)
        self._ahead = ahead
        self._stopped = threading.Event()
        self._fatal: GraphError | None = None
        self._pool = ThreadPoolExecutor(client.concurrency, thread_name_prefix="graph-read")
        self._pending: deque[Future[PolicyRead]] = deque()

    def __enter__(self) -> PolicyReads:
        self._submit()
        return self

    def __iter__(self) -> Iterator[PolicyRead]:
        while self._pending:
            # Dropped once handed over: the caller holds one contract's objects at a time.
            read = self._pending.popleft().result()
            self._submit()
            yield read

    def _submit(self) -> None:
        while self._keys and len(self._pending) < self._ahead:
            self._pending.append(self._pool.submit(self._read, self._keys.popleft()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, contract_key: str) -> PolicyRead:
        read = PolicyRead(contract_key)
        if self._fatal is not None:
            read.error = self._fatal
            return read
        try:
            for obj in self._client.read_policies(contract_key):
                if self._stopped.is_set():
                    break
                read.objects.append(obj)
        except GraphError as exc:
            read.error = exc
            if exc.reason_code in FATAL_FOR_ALL_TYPES:
                self._fatal = exc
        return read
