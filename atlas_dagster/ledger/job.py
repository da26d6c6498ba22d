"""The job side of the ledger: a run claims its row, owns it while it works, and completes it.

``claim`` finds (or adopts) the row, takes its identity, records this process as the executor
with a fencing token and a heartbeat, and waits for the tenant's slot (one running row per
tenant). ``operation_scope`` wraps a job's work in that and completes the row when the work ends.
Every write the work makes goes through ``OperationHandle`` or a ``FencedEngine`` and commits only
while the row is still its own.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import sqlalchemy as sa
from dagster import DagsterInstance

from atlas_dagster import schema
from atlas_dagster.ledger import liveness
from atlas_dagster.ledger.mirror import resolve_row
from atlas_dagster.ledger.reconcile import reap, row_dead_reason
from atlas_dagster.ledger.run_types import Outcome, Status
from atlas_dagster.ledger.store import FencedOut, OperationLedger, OperationRun
from atlas_dagster.reasons import RUN_CANCELLED, failure, failure_of
from atlas_dagster.resources.ledger import LedgerResource

log = logging.getLogger("atlas_dagster.ledger.job")

# How often a run waiting for its tenant's slot looks again.
SLOT_POLL_SECONDS = 0.5


class DuplicateRun(dg.Failure):
    pass


class FencedEngine:
    """An engine whose write transactions (``begin()``) commit only while the run still owns
    its ledger row: the fence is checked, and the row locked, inside each transaction. Reads and
    everything else pass through to the engine."""

    def __init__(self, engine: sa.Engine, ledger: OperationLedger, row_id: int, token: str):
        self._engine, self._ledger, self._row_id, self._token = engine, ledger, row_id, token

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self._engine.begin() as conn:
            self._ledger.fence(conn, self._row_id, self._token)
            yield conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass
class OperationHandle:
    """What a running job may do to its own ledger row — only while it owns it (``token``)."""

    ledger: OperationLedger
    row: OperationRun
    token: str
    heartbeat: liveness.Heartbeat | None = None

    @property
    def id(self) -> int:
        return self.row.id

    def _record(self, **values: Any) -> None:
        if not self.ledger.record_progress(self.row.id, token=self.token, **values):
            raise FencedOut(f"operation run #{self.row.id} is no longer owned by this run")

    def progress(self, **counts: Any) -> None:
        self._record(summary_counts=counts)

    def fail(self, reason_code: str, message: str, contract_key: str | None = None) -> None:
        self._record(failures=[failure(reason_code, message, contract_key)])

    def set_context(self, **values: Any) -> None:
        self._record(context=values)

    def declare_outcome(self, outcome: str) -> None:
        self.set_context(declared_outcome=outcome)

    def fenced(self, engine: sa.Engine) -> FencedEngine:
        """``engine`` for this run's writes to the cached tables."""
        return FencedEngine(engine, self.ledger, self.row.id, self.token)

    def finish(self) -> None:
        """The work is done: complete the row with its outcome (the mirror confirms it later),
        which frees the tenant's slot at once."""
        fresh = self.ledger.get(self.row.id) or self.row
        outcome = fresh.context.get("declared_outcome") or (
            Outcome.PARTIALLY_SUCCEEDED if fresh.failure_summary else Outcome.SUCCEEDED
        )
        if not self.ledger.complete(self.row.id, outcome, token=self.token):
            raise FencedOut(f"operation run #{self.row.id} is no longer owned by this run")

    def abandon(self, exc: BaseException) -> None:
        """The work stopped with ``exc``: record why and complete the row."""
        if isinstance(exc, FencedOut):
            return  # the row is not ours any more: nothing may be written
        if isinstance(exc, Exception) and not isinstance(exc, dg.DagsterExecutionInterruptedError):
            entry, outcome = failure_of(exc), Outcome.FAILED
        else:
            entry = failure(RUN_CANCELLED, "the run was interrupted")
            outcome = Outcome.CANCELLED
        try:
            self.ledger.complete(self.row.id, outcome, failures=[entry], token=self.token)
        except Exception:  # the reconciler completes it from Dagster's record instead
            log.exception("could not complete operation run #%s", self.row.id)

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


def claim(
    ledger: OperationLedger,
    run: dg.DagsterRun,
    *,
    say: Callable[[str], None] = log.warning,
    instance: DagsterInstance | None = None,
) -> OperationHandle:
    """Called by a job as it starts: find (or adopt) its row, take its identity, record this
    process as its executor and start its heartbeat, then wait for the tenant's slot and mark
    the row running. A run whose identity is held by another active run stops without doing
    the work."""
    row = resolve_row(ledger, run, schema.utcnow())
    if row is None:
        raise dg.Failure(f"job {run.job_name} is not tracked by the operation ledger")
    if row.status == Status.COMPLETED:
        raise DuplicateRun(f"operation run #{row.id} is already completed ({row.outcome})")
    pending = row.context.get("pending_identity")
    if pending and row.run_identity_hash != pending and not ledger.take_identity(row.id, pending):
        holder = ledger.holder_of_identity(row.provider_connection_id, pending)
        message = (
            f"another run of this operation is active (operation run #{holder.id})"
            if holder
            else "another run of this operation is active"
        )
        ledger.complete(row.id, Outcome.CANCELLED, failures=[failure(RUN_CANCELLED, message)])
        raise DuplicateRun(message)
    me = liveness.here()
    recorded = liveness.Executor.from_dict(row.executor) if row.executor else None
    if recorded == me and row.executor_token:
        token = row.executor_token  # the in-process start that created the row runs it here
    else:
        token = uuid.uuid4().hex
        if not ledger.take_executor(row.id, me.to_dict(), token):
            raise DuplicateRun(f"operation run #{row.id} completed before this run took it")
    heartbeat = liveness.Heartbeat(lambda: ledger.heartbeat(row.id, token)).start()
    try:
        _wait_for_slot(ledger, row, token, run.run_id, say, instance)
    except BaseException:
        heartbeat.stop()
        raise
    fresh = ledger.get(row.id)
    assert fresh is not None
    return OperationHandle(ledger, fresh, token, heartbeat)


def _wait_for_slot(
    ledger: OperationLedger,
    row: OperationRun,
    token: str,
    dagster_run_id: str,
    say: Callable[[str], None],
    instance: DagsterInstance | None,
) -> None:
    told: int | None = None
    while (holder := ledger.take_slot(row.id, token, dagster_run_id=dagster_run_id)) is not None:
        reason = row_dead_reason(holder)
        if reason:
            reap(ledger, holder, reason, instance)
            continue
        if told != holder.id:
            say(
                f"waiting for operation run #{holder.id} ({holder.type}, started "
                f"{holder.started_at:%H:%M:%S} UTC) of this tenant to finish: the runs of one "
                "tenant are serialised"
                if holder.started_at
                else f"waiting for operation run #{holder.id} ({holder.type}) of this tenant"
            )
            told = holder.id
        time.sleep(SLOT_POLL_SECONDS)


@contextmanager
def operation_scope(
    context: dg.OpExecutionContext | dg.AssetExecutionContext, ledger: LedgerResource
) -> Iterator[OperationHandle]:
    """Wraps a job's work: claims the row, completes it when the work ends (failed, with the
    reason, when it raised), and stops the heartbeat."""
    handle = claim(ledger.ledger(), context.run, say=context.log.warning, instance=context.instance)
    try:
        yield handle
    except BaseException as exc:
        handle.abandon(exc)
        raise
    else:
        handle.finish()
    finally:
        handle.close()
