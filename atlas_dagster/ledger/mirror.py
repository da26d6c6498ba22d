"""The mirror: Dagster runs → ``operation_runs``.

Every Dagster run of the code location gets its ledger row brought in line with the run —
status, times, outcome, ``dagster_run_id`` — idempotently: a tagged run by its tag, a run
launched without the tag (the Dagster UI) by adoption. Once a row completed, the ledger's verdict
goes back onto the run as tags. Handlers never raise where a sensor calls them (see sensors.py);
reconcile.py makes the two converge when events are lost.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from atlas_dagster import db
from atlas_dagster.ledger.run_types import (
    JOB_TYPES,
    LEDGER_JOBS,
    RUN_TYPES,
    TAG_BACKUP_SCHEDULE,
    TAG_CONNECTION,
    TAG_OPERATION_RUN_ID,
    TAG_OUTCOME,
    TAG_REASON_PREFIX,
    TAG_RUN_TYPE,
    Identity,
    Outcome,
    StartRequest,
    Status,
    Trigger,
)
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.reasons import RUN_CANCELLED, RUN_CRASHED, failure

log = logging.getLogger("atlas_dagster.ledger.mirror")


def timestamp(value: float | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)


def _trigger(tags: dict[str, str]) -> tuple[Trigger, str]:
    if "dagster/schedule_name" in tags:
        return Trigger.SCHEDULE, tags["dagster/schedule_name"]
    if "dagster/sensor_name" in tags:
        return Trigger.SENSOR, tags["dagster/sensor_name"]
    if "dagster/backfill" in tags:
        return Trigger.BACKFILL, f"backfill {tags['dagster/backfill']}"
    return Trigger.DAGSTER_UI, tags.get("dagster/user") or "dagster-ui"


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
    if rt is None or rt.job_name != run.job_name or rt.identity is Identity.STRICT:
        rt = JOB_TYPES[run.job_name]
    partition = tags.get("dagster/partition")
    conn_id = _connection_id(ledger, partition)
    trigger, initiator = _trigger(tags)
    pending = placeholder = None
    if rt.identity is Identity.DETERMINISTIC:
        # The run may be queued behind the holder of its identity (the per-tenant concurrency
        # limit serialises them): adopt it under a placeholder identity; the job takes the real
        # one when it starts (see claim).
        pending = rt.identity_hash({"provider_connection_id": conn_id, "target_scope": "all"})
        placeholder = hashlib.sha256(f"adopted:{run.run_id}".encode()).hexdigest()
    elif rt.identity is Identity.STRICT:
        # A strict run launched without its row (a restore execution from the UI) holds an
        # identity of its own, and its job finds nothing to do.
        placeholder = hashlib.sha256(f"adopted:{run.run_id}".encode()).hexdigest()
    request = StartRequest(
        rt,
        connection_key=partition,
        connection_id=conn_id,
        trigger=trigger,
        initiator=initiator,
        schedule_key=tags.get(TAG_BACKUP_SCHEDULE) or None,
        adopted_run_id=run.run_id,
        pending_identity=pending,
    )
    # A concurrent adoption of the same run is settled inside start (found by its run id).
    return ledger.open(
        request, dagster_run_id=run.run_id, created_at=created_at, identity=placeholder
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
    ledger: OperationLedger, instance: DagsterInstance, record: dg.RunRecord
) -> OperationRun | None:
    """Bring one run's ledger row in line with the run. Idempotent."""
    run = record.dagster_run
    row = resolve_row(ledger, run, timestamp(record.create_timestamp))
    if row is None:
        return None
    if row.status != Status.COMPLETED:
        _mirror_status(ledger, instance, record, row)
        row = ledger.get(row.id)
    if row is not None and row.status == Status.COMPLETED:
        _write_verdict_tags(instance, run, row)
    return row


def _mirror_status(
    ledger: OperationLedger, instance: DagsterInstance, record: dg.RunRecord, row: OperationRun
) -> None:
    # A run's row turns running only when its job takes the tenant's slot (claim), not when
    # Dagster starts the run: the job may still wait behind another run of the tenant.
    run = record.dagster_run
    if row.dagster_run_id is None:
        ledger.attach_dagster_run(row.id, run.run_id)
    status = run.status
    started, ended = timestamp(record.start_time), timestamp(record.end_time)
    if status == DagsterRunStatus.SUCCESS:
        fresh = ledger.get(row.id) or row
        outcome = fresh.context.get("declared_outcome") or (
            Outcome.PARTIALLY_SUCCEEDED if fresh.failure_summary else Outcome.SUCCEEDED
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
        ledger.complete(
            row.id, Outcome.FAILED, failures=extra, started_at=started, completed_at=ended
        )
    elif status == DagsterRunStatus.CANCELED:
        ledger.complete(
            row.id,
            Outcome.CANCELLED,
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
