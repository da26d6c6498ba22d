"""Convergence: dead work is reaped, and the ledger catches up with Dagster's run records.

Run-status sensors can drop or repeat events and never see runs from before their first tick; a
run worker can die without Dagster noticing (the default run launcher has no health check); an
``--in-process`` start can be killed outright. One reconciliation pass reaps every active row whose
work is dead (liveness.py), fails the Dagster runs of such rows, and mirrors every run updated
since the cursor plus every active row, until the two agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from atlas_dagster import schema
from atlas_dagster.ledger import liveness
from atlas_dagster.ledger.mirror import mirror_record, timestamp
from atlas_dagster.ledger.run_types import LEDGER_JOBS, Outcome, Status
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.reasons import RUN_CRASHED, failure

log = logging.getLogger("atlas_dagster.ledger.reconcile")

DISPATCH_GRACE = timedelta(minutes=10)
_IN_PROGRESS = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)


def _worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20, ascending=True
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None or not (event.message or "").startswith("Started process for run"):
            continue
        pid = (event.engine_event_data.metadata or {}).get("pid")
        value = getattr(pid, "value", pid)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def fail_dead_workers(instance: DagsterInstance, records: list[dg.RunRecord]) -> list[str]:
    """Dagster's run monitoring cannot see a killed worker under the default run launcher (it has
    no health check), so such a run would stay STARTED forever. The default launcher runs workers
    on this machine: a STARTED run whose worker process is gone has crashed; report it as Dagster's
    monitoring would."""
    import psutil
    from dagster import DefaultRunLauncher

    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []
    failed = []
    for record in records:
        run = record.dagster_run
        if run.status != DagsterRunStatus.STARTED or run.job_name not in LEDGER_JOBS:
            continue
        pid = _worker_pid(instance, run.run_id)
        if pid is None:
            continue
        try:
            alive = psutil.Process(pid).create_time() <= (record.start_time or 0) + 5
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:
            alive = True
        if not alive:
            instance.report_run_failed(
                run, f"run worker process {pid} exited unexpectedly (it is no longer running)"
            )
            failed.append(run.run_id)
    return failed


def row_dead_reason(row: OperationRun, now: datetime | None = None) -> str | None:
    """Why an active row's work is dead, or None while it may live (see liveness.py). A running
    row from before executors were recorded is judged by its last update instead."""
    now = now or schema.utcnow()
    if row.executor is None and row.status == Status.RUNNING:
        return liveness.stale_reason(row.updated_at, now, "its run (recorded before executors)")
    return liveness.dead_reason(row.executor, row.heartbeat_at, now)


def reap(
    ledger: OperationLedger,
    row: OperationRun,
    reason: str,
    instance: DagsterInstance | None = None,
) -> bool:
    """Complete a dead row ``failed``/``run_crashed`` (only if it is still the same execution's:
    the token condition) and fail its Dagster run if Dagster still has it in progress. The
    identity and the tenant's slot are free afterwards."""
    message = f"the run's work died: {reason}"
    done = ledger.complete(
        row.id,
        Outcome.FAILED,
        failures=[failure(RUN_CRASHED, message)],
        token=row.executor_token,
        # A run Dagster already ended (its monitoring saw the worker die first) ended then.
        completed_at=_ended_at(instance, row.dagster_run_id),
    )
    if done:
        log.warning("operation run #%s: %s", row.id, message)
    if instance is not None and row.dagster_run_id:
        _fail_dagster_run(instance, row.dagster_run_id, message)
    return done


def _ended_at(instance: DagsterInstance | None, run_id: str | None) -> datetime | None:
    if instance is None or run_id is None:
        return None
    try:
        record = instance.get_run_record_by_id(run_id)
    except Exception:  # the time is a nicety; the reap must not depend on it
        log.exception("could not read Dagster run %s", run_id)
        return None
    if record is None or record.dagster_run.status in _IN_PROGRESS:
        return None
    return timestamp(record.end_time)


def _fail_dagster_run(instance: DagsterInstance, run_id: str, message: str) -> None:
    try:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in _IN_PROGRESS:
            instance.report_run_failed(run, message)
    except Exception:  # the ledger is settled; the reconciler retries the Dagster side
        log.exception("could not mark Dagster run %s failed", run_id)


def reap_dead(
    ledger: OperationLedger, instance: DagsterInstance | None, now: datetime | None = None
) -> list[int]:
    """Reap every active row whose work is dead."""
    reaped = []
    for row in ledger.active():
        reason = row_dead_reason(row, now)
        if reason and reap(ledger, row, reason, instance):
            reaped.append(row.id)
    return reaped


def _fail_runs_of_crashed_rows(
    ledger: OperationLedger, instance: DagsterInstance, started: list[dg.RunRecord]
) -> None:
    """A row reaped where no Dagster instance was at hand leaves its run STARTED: end it."""
    for record in started:
        if record.dagster_run.job_name not in LEDGER_JOBS:
            continue
        row = ledger.find_by_dagster_run(record.dagster_run.run_id)
        if row is not None and row.status == Status.COMPLETED and row.outcome == Outcome.FAILED:
            crash = next((f for f in row.failure_summary if f["reason_code"] == RUN_CRASHED), None)
            if crash is not None:
                _fail_dagster_run(instance, record.dagster_run.run_id, crash["message"])


@dataclass
class ReconcileResult:
    cursor: float | None
    mirrored: int = 0
    expired: list[int] = field(default_factory=list)
    reaped: list[int] = field(default_factory=list)
    errors: int = 0


def reconcile(
    ledger: OperationLedger,
    instance: DagsterInstance,
    cursor: float | None,
    *,
    grace: timedelta = DISPATCH_GRACE,
    limit: int = 200,
    now: datetime | None = None,
) -> ReconcileResult:
    """One reconciliation pass: runs updated since ``cursor``, then every active ledger row."""
    now = now or schema.utcnow()
    result = ReconcileResult(cursor)
    result.reaped = reap_dead(ledger, instance, now)
    # Overlap the cursor by a second: same-timestamp updates are re-read, which is harmless.
    after = timestamp(cursor - 1.0) if cursor is not None else None
    records = instance.get_run_records(
        filters=RunsFilter(updated_after=after),
        limit=limit,
        order_by="update_timestamp",
        ascending=True,
    )
    started = instance.get_run_records(
        filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]), limit=limit
    )
    _fail_runs_of_crashed_rows(ledger, instance, list(started))
    dead = set(fail_dead_workers(instance, list(started)))
    if dead:
        records = [*records, *instance.get_run_records(filters=RunsFilter(run_ids=list(dead)))]
    mirrored: set[str] = set()
    for record in records:
        if record.dagster_run.job_name in LEDGER_JOBS:
            result.errors += not _safely(mirror_record, ledger, instance, record)
            result.mirrored += 1
            mirrored.add(record.dagster_run.run_id)
        stamp = timestamp(record.update_timestamp)
        if stamp is not None:
            result.cursor = max(result.cursor or 0.0, stamp.timestamp())
    for row in ledger.active():
        if row.dagster_run_id is None or row.dagster_run_id in mirrored:
            continue
        record = instance.get_run_record_by_id(row.dagster_run_id)
        if record is not None:
            result.errors += not _safely(mirror_record, ledger, instance, record)
        elif row.created_at < now - grace and ledger.fail_dispatch(
            row.id, f"Dagster run {row.dagster_run_id} does not exist in this instance"
        ):
            result.expired.append(row.id)
    result.expired += ledger.expire_undispatched(grace, now=now)
    return result


def _safely(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:
        log.exception("mirroring a run into operation_runs failed; the reconciler will retry")
        return False
