"""The mirror: Dagster runs → ``operation_runs`` (DESIGN §6), and the job side of the ledger.

Run-status sensors can drop or repeat events and never see runs from before their first tick, so
every handler here is idempotent and never raises, and a reconciling sensor walks run records by
``updated_after`` plus the ledger's active rows until the two agree.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.dagster_run import RunRecord

from atlas_dagster import db, liveness, schema
from atlas_dagster.reasons import (
    RUN_CANCELLED,
    RUN_CRASHED,
    failure,
    failure_of,
)
from atlas_dagster.resources.ledger import (
    JOB_TYPES,
    RUN_TYPES,
    TAG_BACKUP_SCHEDULE,
    TAG_OPERATION_RUN_ID,
    TAG_RUN_TYPE,
    FencedOut,
    LedgerResource,
    OperationLedger,
    OperationRun,
    identity_hash,
)

log = logging.getLogger("atlas_dagster.mirror")

DISPATCH_GRACE = timedelta(minutes=10)
LEDGER_JOBS = frozenset(JOB_TYPES)
# How often a run waiting for its tenant's slot looks again.
SLOT_POLL_SECONDS = 0.5
TAG_OUTCOME = "atlas/outcome"
TAG_CONNECTION = "atlas/connection"
TAG_REASON_PREFIX = "atlas/reason/"
_IN_PROGRESS = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)


def _ts(value: float | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)


def _trigger(tags: dict[str, str]) -> tuple[str, str]:
    if "dagster/schedule_name" in tags:
        return "schedule", tags["dagster/schedule_name"]
    if "dagster/sensor_name" in tags:
        return "sensor", tags["dagster/sensor_name"]
    if "dagster/backfill" in tags:
        return "backfill", f"backfill {tags['dagster/backfill']}"
    return "dagster_ui", tags.get("dagster/user") or "dagster-ui"


def resolve_row(
    ledger: OperationLedger,
    run: dg.DagsterRun,
    created_at: datetime | None = None,
) -> OperationRun | None:
    """The ledger row of a Dagster run: by tag, by run id, or adopted (created) for a run that was
    launched without the tag (the Dagster UI). None for runs of jobs the ledger does not track.

    A re-execution from the Dagster UI copies its parent's tags: a tagged row that already
    belongs to another Dagster run is the parent's, and the re-execution is adopted instead."""
    tagged = run.tags.get(TAG_OPERATION_RUN_ID)
    if tagged and tagged.isdigit():
        row = ledger.get(int(tagged))
        if row is not None and row.dagster_run_id in (None, run.run_id):
            return row
    row = ledger.find_by_dagster_run(run.run_id)
    if row is not None or run.job_name not in LEDGER_JOBS:
        return row
    return _adopt(ledger, run, created_at)


def _adopt(
    ledger: OperationLedger, run: dg.DagsterRun, created_at: datetime | None
) -> OperationRun:
    tags = dict(run.tags)
    rt = RUN_TYPES.get(tags.get(TAG_RUN_TYPE, ""))
    # Scheduled rows are always created by their schedule before the run: an untagged scheduled
    # backup was started by hand, as the job's user-facing type.
    if rt is None or rt.job_name != run.job_name or rt.identity == "strict":
        rt = RUN_TYPES[JOB_TYPES[run.job_name]]
    partition = tags.get("dagster/partition")
    conn_id = _connection_id(ledger, partition)
    trigger_source, initiator = _trigger(tags)
    context: dict[str, Any] = {"provider_connection_key": partition, "adopted": True}
    if tags.get(TAG_BACKUP_SCHEDULE):
        context["backup_schedule_key"] = tags[TAG_BACKUP_SCHEDULE]
    placeholder = None
    if rt.identity == "deterministic":
        # The run may be queued behind the holder of its identity (the per-tenant concurrency
        # limit serialises them): adopt it under a placeholder identity; the job takes the real
        # one when it starts (see claim).
        context["pending_identity"] = identity_hash(
            rt, {"provider_connection_id": conn_id, "target_scope": "all"}
        )
        placeholder = hashlib.sha256(f"adopted:{run.run_id}".encode()).hexdigest()
    else:
        context["nonce"] = run.run_id
    # A concurrent adoption of the same run is settled inside start (found by its run id).
    return ledger.start(
        rt.name,
        provider_connection_id=conn_id,
        trigger_source=trigger_source,
        initiator=initiator,
        context=context,
        dagster_run_id=run.run_id,
        created_at=created_at,
        identity=placeholder,
    ).row


def _connection_id(ledger: OperationLedger, key: str | None) -> int | None:
    return db.connection_ids(ledger.engine).get(key) if key else None


def _crash_failure(instance: DagsterInstance, run_id: str) -> dict[str, Any]:
    message = "the Dagster run failed outside any step (its worker crashed or was killed)"
    try:
        records = instance.get_records_for_run(
            run_id, of_type=DagsterEventType.RUN_FAILURE, limit=1, ascending=False
        ).records
        if records and records[0].event_log_entry.dagster_event is not None:
            text = records[0].event_log_entry.dagster_event.message or ""
            if text:
                message = text.strip().splitlines()[0]
    except Exception:  # the reason is a nicety; the outcome must still be written
        log.exception("could not read the failure event of run %s", run_id)
    return failure(RUN_CRASHED, message)


def mirror_record(
    ledger: OperationLedger, instance: DagsterInstance, record: RunRecord
) -> OperationRun | None:
    """Bring one run's ledger row in line with the run. Idempotent."""
    run = record.dagster_run
    row = resolve_row(ledger, run, _ts(record.create_timestamp))
    if row is None:
        return None
    if row.status != "completed":
        _mirror_status(ledger, instance, record, row)
        row = ledger.get(row.id)
    if row is not None and row.status == "completed":
        _write_verdict_tags(instance, run, row)
    return row


def _mirror_status(
    ledger: OperationLedger, instance: DagsterInstance, record: RunRecord, row: OperationRun
) -> None:
    # A run's row turns running only when its job takes the tenant's slot (claim), not when
    # Dagster starts the run: the job may still wait behind another run of the tenant.
    run = record.dagster_run
    if row.dagster_run_id is None:
        ledger.attach_dagster_run(row.id, run.run_id)
    status = run.status
    started, ended = _ts(record.start_time), _ts(record.end_time)
    if status == DagsterRunStatus.SUCCESS:
        fresh = ledger.get(row.id) or row
        outcome = fresh.context.get("declared_outcome") or (
            "partially_succeeded" if fresh.failure_summary else "succeeded"
        )
        ledger.complete(row.id, outcome, started_at=started, completed_at=ended)
    elif status == DagsterRunStatus.FAILURE:
        fresh = ledger.get(row.id) or row
        # Failures the job recorded explain a run only if a step failed; a worker killed after
        # recording some (e.g. one unreachable contract) still crashed.
        step_failed = instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.STEP_FAILURE, limit=1
        ).records
        explained = fresh.failure_summary and step_failed
        extra = [] if explained else [_crash_failure(instance, run.run_id)]
        ledger.complete(row.id, "failed", failures=extra, started_at=started, completed_at=ended)
    elif status == DagsterRunStatus.CANCELED:
        ledger.complete(
            row.id,
            "cancelled",
            failures=[failure(RUN_CANCELLED, "the Dagster run was cancelled")],
            started_at=started,
            completed_at=ended,
        )


def verdict_tags(row: OperationRun, connection_key: str | None) -> dict[str, str]:
    """The ledger's verdict as Dagster run tags, so the Runs page filters by it."""
    tags = {TAG_OUTCOME: row.outcome}
    if connection_key:
        tags[TAG_CONNECTION] = connection_key
    for entry in row.failure_summary:
        tags[f"{TAG_REASON_PREFIX}{entry['reason_code']}"] = "true"
    return tags


def _write_verdict_tags(instance: DagsterInstance, run: dg.DagsterRun, row: OperationRun) -> None:
    if row.dagster_run_id != run.run_id:
        return
    key = row.context.get("provider_connection_key") or run.tags.get("dagster/partition")
    missing = {k: v for k, v in verdict_tags(row, key).items() if run.tags.get(k) != v}
    if missing:
        instance.add_run_tags(run.run_id, missing)


def mirror_run_id(
    ledger: OperationLedger, instance: DagsterInstance, run_id: str
) -> OperationRun | None:
    record = instance.get_run_record_by_id(run_id)
    return mirror_record(ledger, instance, record) if record else None


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


def fail_dead_workers(instance: DagsterInstance, records: list[RunRecord]) -> list[str]:
    """Dagster's run monitoring cannot see a killed worker under the default run launcher (it has
    no health check), so such a run would stay STARTED forever. The default launcher runs workers
    on this machine: a STARTED run whose worker process is gone has crashed; report it as Dagster's
    monitoring would."""
    import psutil
    from dagster._core.launcher import DefaultRunLauncher

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
    if row.executor is None and row.status == "running":
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
        row.id, "failed", failures=[failure(RUN_CRASHED, message)], token=row.executor_token
    )
    if done:
        log.warning("operation run #%s: %s", row.id, message)
    if instance is not None and row.dagster_run_id:
        _fail_dagster_run(instance, row.dagster_run_id, message)
    return done


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
    ledger: OperationLedger, instance: DagsterInstance, started: list[RunRecord]
) -> None:
    """A row reaped where no Dagster instance was at hand leaves its run STARTED: end it."""
    for record in started:
        if record.dagster_run.job_name not in LEDGER_JOBS:
            continue
        row = ledger.find_by_dagster_run(record.dagster_run.run_id)
        if row is not None and row.status == "completed" and row.outcome == "failed":
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
    after = _ts(cursor - 1.0) if cursor is not None else None
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
        stamp = _ts(record.update_timestamp)
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


# --- The job side ----------------------------------------------------------------------------


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
            "partially_succeeded" if fresh.failure_summary else "succeeded"
        )
        if not self.ledger.complete(self.row.id, outcome, token=self.token):
            raise FencedOut(f"operation run #{self.row.id} is no longer owned by this run")

    def abandon(self, exc: BaseException) -> None:
        """The work stopped with ``exc``: record why and complete the row."""
        if isinstance(exc, FencedOut):
            return  # the row is not ours any more: nothing may be written
        if isinstance(exc, Exception) and not isinstance(exc, dg.DagsterExecutionInterruptedError):
            entry, outcome = failure_of(exc), "failed"
        else:
            entry, outcome = failure(RUN_CANCELLED, "the run was interrupted"), "cancelled"
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
    if row.status == "completed":
        raise DuplicateRun(f"operation run #{row.id} is already completed ({row.outcome})")
    pending = row.context.get("pending_identity")
    if pending and row.run_identity_hash != pending and not ledger.take_identity(row.id, pending):
        holder = ledger.holder_of_identity(row.provider_connection_id, pending)
        message = (
            f"another run of this operation is active (operation run #{holder.id})"
            if holder
            else "another run of this operation is active"
        )
        ledger.complete(row.id, "cancelled", failures=[failure(RUN_CANCELLED, message)])
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


# --- Sensors ----------------------------------------------------------------------------------


def _on_status(context: dg.RunStatusSensorContext, ledger: LedgerResource) -> None:
    try:
        mirror_run_id(ledger.ledger(), context.instance, context.dagster_run.run_id)
    except Exception:
        log.exception("run-status mirror failed for %s", context.dagster_run.run_id)


def _status_sensor(status: DagsterRunStatus, name: str):
    @dg.run_status_sensor(
        run_status=status,
        name=name,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Mirrors {status.value} runs into operation_runs.",
    )
    def _sensor(context: dg.RunStatusSensorContext, ledger: LedgerResource):
        _on_status(context, ledger)

    return _sensor


mirror_sensors = [
    _status_sensor(DagsterRunStatus.STARTED, "operation_runs_mirror_started"),
    _status_sensor(DagsterRunStatus.SUCCESS, "operation_runs_mirror_success"),
    _status_sensor(DagsterRunStatus.FAILURE, "operation_runs_mirror_failure"),
    _status_sensor(DagsterRunStatus.CANCELED, "operation_runs_mirror_canceled"),
]


@dg.sensor(
    name="operation_runs_reconciler",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes operation_runs converge on Dagster's run records (dropped events, crashed "
    "workers, runs from before the sensors started, starts that were never dispatched).",
)
def operation_runs_reconciler(context: dg.SensorEvaluationContext, ledger: LedgerResource):
    cursor = float(context.cursor) if context.cursor else None
    try:
        result = reconcile(ledger.ledger(), context.instance, cursor)
    except Exception:
        log.exception("reconciliation pass failed; retrying next tick")
        return dg.SkipReason("reconciliation pass failed; see the daemon log")
    if result.cursor is not None:
        context.update_cursor(str(result.cursor))
    return dg.SkipReason(
        f"mirrored {result.mirrored} run(s), reaped {len(result.reaped)} dead row(s), "
        f"expired {len(result.expired)} undispatched row(s)"
        + (f", {result.errors} failed and will be retried" if result.errors else "")
    )
