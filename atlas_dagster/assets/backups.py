"""The ``backups`` asset, ``backup_job`` and one Dagster schedule per configured backup schedule.

A backup run (``backup_schedule.run_now``, ``.retry`` or ``.scheduled``) writes one backup set of
its schedule: every selected policy type read completely through the GraphClient, each policy
stored as an item whose payload is kept once per content hash (``stores.backups``). A type that
fails (403, throttled out) is recorded on the set and the ledger row, and the others are still
backed up. A retry reads only the types its original run failed and carries the original set's
other types over, so every set is a whole snapshot of its schedule.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from sqlalchemy.engine import Engine

from atlas_dagster.assets.common import (
    Log,
    Progress,
    connection_for_run,
    graph_counts,
    int_metadata,
    table_metadata,
)
from atlas_dagster.config import AtlasConfig, BackupSchedule
from atlas_dagster.connections import ensure_partitions, provider_connection_partitions
from atlas_dagster.db import connection_ids
from atlas_dagster.graph import GraphClient
from atlas_dagster.ledger.job import OperationHandle, operation_scope
from atlas_dagster.ledger.run_types import RUN_TYPES, TAG_BACKUP_SCHEDULE, StartRequest, Trigger
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.reasons import (
    FATAL_FOR_ALL_TYPES,
    PROVIDER_BAD_RESPONSE,
    PROVIDER_CONNECTION_INVALID,
    PROVIDER_CONNECTION_MISSING,
    AtlasError,
    GraphError,
    failure,
    failure_of,
)
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.schedules import dagster_name
from atlas_dagster.stores import backups as store
from atlas_dagster.stores.backup_diff import change_counts
from atlas_dagster.stores.checks import record_denied
from graph_contracts import CONTRACTS, POLICY_CONTRACTS

SCHEDULED = "backup_schedule.scheduled"


# --- Planning (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class BackupPlan:
    """What one run backs up: the types it reads from Graph, and the types it carries over
    unchanged from an earlier set (a retry)."""

    schedule: store.ScheduleRow
    read_types: tuple[str, ...]
    carry_from: int | None = None
    carry_types: tuple[str, ...] = ()

    @property
    def policy_types(self) -> tuple[str, ...]:
        return tuple(k for k in POLICY_CONTRACTS if k in {*self.read_types, *self.carry_types})


def plan_backup(
    schedule: store.ScheduleRow,
    retried: OperationRun | None = None,
    retried_set: store.BackupSet | None = None,
) -> BackupPlan:
    """A fresh run reads every type of its schedule. A retry reads the types its original run
    failed and carries the others over from the original set; when that set holds no usable copy
    (the run failed outright, or retention removed it) it reads them all again."""
    if retried is None:
        return BackupPlan(schedule, schedule.policy_types)
    if retried_set is None or not retried_set.covered_types:
        return BackupPlan(schedule, schedule.policy_types)
    failed = {
        f["contract_key"]
        for f in retried.failure_summary
        if f.get("contract_key") in POLICY_CONTRACTS
    }
    failed |= set(retried_set.policy_types) - retried_set.covered_types
    carry = retried_set.covered_types - failed
    return BackupPlan(
        schedule,
        tuple(k for k in POLICY_CONTRACTS if k in failed),
        retried_set.id,
        tuple(k for k in POLICY_CONTRACTS if k in carry),
    )


def set_status(read: int, failed: int, carried: int) -> str:
    if failed == 0:
        return store.SET_COMPLETE
    return store.SET_FAILED if failed == read and carried == 0 else store.SET_PARTIAL


# --- The backup --------------------------------------------------------------------------------


@dataclass
class TypeResult:
    contract_key: str
    stored: store.StoreResult = field(default_factory=store.StoreResult)
    error: GraphError | None = None


@dataclass
class BackupSummary:
    set_id: int
    status: str
    results: list[TypeResult]
    carried_items: int
    graph: dict[str, int]
    duration_s: float
    changes: dict[str, int] = field(default_factory=dict)
    retention: store.RetentionResult = field(default_factory=store.RetentionResult)

    def counts(self) -> dict[str, int]:
        return {
            "items": sum(r.stored.items for r in self.results) + self.carried_items,
            "items_read": sum(r.stored.items for r in self.results),
            "items_carried": self.carried_items,
            "new_payloads": sum(r.stored.new_payloads for r in self.results),
            "new_payload_bytes": sum(r.stored.new_payload_bytes for r in self.results),
            "types_read": len(self.results),
            "types_failed": sum(1 for r in self.results if r.error is not None),
            **graph_counts(self.graph),
        }


def read_type(
    objects: Iterable[dict[str, Any]], contract_key: str, groups: dict, filters: dict
) -> list[store.ItemRecord]:
    """Every policy of one type (``objects``, its complete read), as records (first sight wins
    for a repeated id)."""
    contract = CONTRACTS[contract_key]
    records: dict[str, store.ItemRecord] = {}
    for obj in objects:
        if obj.get("id") is None:
            raise GraphError(
                PROVIDER_BAD_RESPONSE,
                f"{contract_key}: an object without an id",
                contract_key=contract_key,
            )
        record = store.item_record(contract, obj, groups, filters)
        records.setdefault(record.external_id, record)
    return list(records.values())


def run_backup(
    engine: Engine,
    client: GraphClient,
    plan: BackupPlan,
    set_id: int,
    handle: OperationHandle | None,
    *,
    log: Log | None = None,
) -> BackupSummary:
    """Fill backup set ``set_id`` as planned and finish it. A type's items are stored only once
    the whole type was read, so a set never holds half a type."""
    started = time.monotonic()
    before = client.stats.as_dict()
    conn_id = plan.schedule.provider_connection_id
    results: list[TypeResult] = []
    failures: list[dict[str, Any]] = []
    carried = 0
    try:
        # The types are read side by side while the set is prepared, and stored here, in order.
        with client.policy_reads(plan.read_types) as reads, Progress(log) as progress:
            groups, filters = store.cached_names(engine, conn_id)
            if plan.carry_from is not None:
                carried = store.carry_items(engine, plan.carry_from, set_id, plan.carry_types)
            for read in reads:
                key = read.contract_key
                result = TypeResult(key)
                results.append(result)
                try:
                    result.stored = store.store_items(
                        engine, set_id, read_type(read.replay(), key, groups, filters)
                    )
                except GraphError as exc:
                    record_denied(engine, conn_id, exc, handle.id if handle else None)
                    if exc.reason_code in FATAL_FOR_ALL_TYPES:
                        raise
                    result.error = exc
                    failures.append(failure(exc.reason_code, exc.message, key))
                    if handle is not None:
                        handle.fail(exc.reason_code, exc.message, key)
                progress.add(
                    f"{key}: {result.stored.items} items, {result.stored.new_payloads} new "
                    "payloads" + (f" ({result.error.reason_code})" if result.error else "")
                )
    except BaseException as exc:
        # Cancelling a run raises a BaseException: the set is finished as failed all the same.
        failures.append(failure_of(exc))
        store.finish_set(engine, set_id, store.SET_FAILED, failures)
        raise
    failed = sum(1 for r in results if r.error is not None)
    status = set_status(len(results), failed, carried)
    store.finish_set(engine, set_id, status, failures)
    return BackupSummary(
        set_id=set_id,
        status=status,
        results=results,
        carried_items=carried,
        graph=client.stats.since(before),
        duration_s=time.monotonic() - started,
    )


def resolve_schedule(engine: Engine, row: OperationRun, conn_id: int) -> store.ScheduleRow:
    """The backup schedule of a run: from its row (start surfaces and the schedule tick put it
    there), else the connection's only schedule (a run launched from the Dagster UI)."""
    context = row.context
    found = None
    if context.get("backup_schedule_id"):
        found = store.find_schedule(engine, schedule_id=int(context["backup_schedule_id"]))
    elif context.get("backup_schedule_key"):
        found = store.find_schedule(engine, key=str(context["backup_schedule_key"]))
    else:
        candidates = store.schedules_of_connection(engine, conn_id)
        if len(candidates) == 1:
            found = candidates[0]
        elif candidates:
            raise AtlasError(
                PROVIDER_CONNECTION_INVALID,
                f"the connection has {len(candidates)} backup schedules; launch the run with the "
                f"tag {TAG_BACKUP_SCHEDULE}=<schedule key>",
            )
    if found is None:
        raise AtlasError(PROVIDER_CONNECTION_MISSING, "no backup schedule for this run")
    if found.provider_connection_id != conn_id:
        raise AtlasError(
            PROVIDER_CONNECTION_INVALID,
            f"backup schedule {found.key!r} belongs to another provider connection",
        )
    return found


def plan_for_run(
    engine: Engine, ledger: OperationLedger, row: OperationRun, schedule: store.ScheduleRow
) -> BackupPlan:
    retry_of = row.context.get("retry_of")
    if retry_of is None:
        return plan_backup(schedule)
    retried = ledger.get(int(retry_of))
    set_id = retried.context.get("backup_schedule_run_id") if retried else None
    retried_set = store.get_set(engine, int(set_id)) if set_id else None
    if retried_set is not None and retried_set.backup_schedule_id != schedule.id:
        retried_set = None
    return plan_backup(schedule, retried, retried_set)


def _scheduled_for(row: OperationRun) -> datetime | None:
    value = row.context.get("scheduled_for")
    return datetime.fromisoformat(value) if value else None


def _metadata(summary: BackupSummary, handle: OperationHandle) -> dict[str, Any]:
    return {
        **int_metadata(summary.counts()),
        "backup_set_id": dg.MetadataValue.int(summary.set_id),
        "backup_set_status": dg.MetadataValue.text(summary.status),
        "changed_since_previous": dg.MetadataValue.json(summary.changes),
        "retention_deleted_sets": dg.MetadataValue.int(len(summary.retention.deleted_sets)),
        "retention_deleted_payloads": dg.MetadataValue.int(summary.retention.deleted_payloads),
        "duration_s": dg.MetadataValue.float(round(summary.duration_s, 3)),
        "operation_run_id": dg.MetadataValue.int(handle.id),
        # The types this run read; a retry's carried-over types are in items_carried.
        "items_per_policy_type": table_metadata(
            (
                ("policy_type", "string"),
                ("items", "int"),
                ("new_payloads", "int"),
                ("failure", "string"),
            ),
            [
                (
                    r.contract_key,
                    r.stored.items,
                    r.stored.new_payloads,
                    r.error.reason_code if r.error else "",
                )
                for r in summary.results
            ],
        ),
    }


@dg.asset(
    name="backups",
    partitions_def=provider_connection_partitions,
    group_name="backups",
    description="Versioned policy backups per backup schedule (tables backup_sets, backup_items, "
    "backup_payloads).",
    kinds={"python", "sql"},
)
def backups(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
):
    with operation_scope(context, ledger) as handle:
        engine = handle.fenced(database.engine())
        connection, conn_id = connection_for_run(database, context.partition_key)
        schedule = resolve_schedule(engine, handle.row, conn_id)
        plan = plan_for_run(engine, ledger.ledger(), handle.row, schedule)
        set_id = store.create_set(
            engine,
            provider_connection_id=conn_id,
            backup_schedule_id=schedule.id,
            operation_run_id=handle.id,
            scheduled_for=_scheduled_for(handle.row),
            policy_types=plan.policy_types,
        )
        handle.set_context(
            backup_schedule_run_id=set_id,
            backup_schedule_id=schedule.id,
            backup_schedule_key=schedule.key,
            **({"carried_from_backup_set_id": plan.carry_from} if plan.carry_from else {}),
        )
        summary = run_backup(
            engine, graph.client(connection), plan, set_id, handle, log=context.log
        )
        if summary.status == store.SET_FAILED:
            handle.progress(**summary.counts())
            first = summary.results[0].error
            assert first is not None
            raise AtlasError(first.reason_code, f"every policy type failed; first: {first}")
        current = store.require_set(engine, set_id)
        summary.changes = change_counts(engine, store.previous_set(engine, current), current)
        summary.retention = store.apply_retention(engine, schedule.id, schedule.retention_days)
        handle.progress(**summary.counts(), changed_since_previous=summary.changes)
        yield dg.MaterializeResult(metadata=_metadata(summary, handle))


backup_job = dg.define_asset_job(
    "backup_job",
    selection=dg.AssetSelection.assets(backups),
    description="Run types backup_schedule.run_now / .retry / .scheduled: one backup set of a "
    "backup schedule.",
)


# --- Schedules ---------------------------------------------------------------------------------


def schedule_name(key: str) -> str:
    """``backup_schedule__<key>``, in the characters Dagster allows."""
    return dagster_name("backup_schedule", key)


def backup_schedules(config: AtlasConfig) -> list[dg.ScheduleDefinition]:
    """One Dagster schedule per configured backup schedule (built from the config: no I/O)."""
    return [_backup_schedule(entry) for entry in config.backup_schedules]


def _backup_schedule(entry: BackupSchedule) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=schedule_name(entry.key),
        cron_schedule=entry.cron,
        execution_timezone=entry.timezone,
        job=backup_job,
        default_status=dg.DefaultScheduleStatus.RUNNING
        if entry.enabled
        else dg.DefaultScheduleStatus.STOPPED,
        description=f"Backs up {entry.provider_connection} ({len(entry.policy_types)} policy "
        f"types, kept {entry.retention_days} days).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, ledger: LedgerResource):
        return scheduled_tick(context, ledger, entry)

    return _schedule


def scheduled_tick(
    context: dg.ScheduleEvaluationContext, ledger: LedgerResource, entry: BackupSchedule
) -> dg.RunRequest | dg.SkipReason:
    """Create the tick's ledger row (strict identity: schedule + scheduled time), then request
    its run. A tick evaluated again finds its row and requests nothing."""
    when = context.scheduled_execution_time
    database = ledger
    engine = database.engine()
    schedule = store.find_schedule(engine, key=entry.key)
    if schedule is None:
        return dg.SkipReason(f"backup schedule {entry.key!r} is not in the database")
    ensure_partitions(context.instance, [entry.provider_connection])
    conn_id = connection_ids(engine)[entry.provider_connection]
    scheduled_for = when.astimezone(UTC).isoformat()
    name = schedule_name(entry.key)
    request = StartRequest(
        RUN_TYPES[SCHEDULED],
        connection_key=entry.provider_connection,
        connection_id=conn_id,
        trigger=Trigger.SCHEDULE,
        initiator=name,
        schedule_id=schedule.id,
        schedule_key=entry.key,
        scheduled_for=scheduled_for,
    )
    started = ledger.ledger().open(request)
    if not started.created:
        return dg.SkipReason(
            f"the tick of {scheduled_for} already has operation run #{started.row.id}"
        )
    return dg.RunRequest(
        run_key=f"{name}:{scheduled_for}",
        partition_key=entry.provider_connection,
        tags=request.tags(started.row.id),
    )
