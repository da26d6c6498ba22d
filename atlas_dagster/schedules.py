"""Optional refresh schedules from the config: one run per configured connection per tick.

Each tick creates the ledger rows first (deterministic identity, deduped while active), then
requests the runs tagged with them — the same create-before-dispatch as every start surface.
"""

import dagster as dg

from atlas_dagster.config import AtlasConfig, RefreshSchedule
from atlas_dagster.connections import ensure_partitions
from atlas_dagster.db import connection_ids
from atlas_dagster.ledger.run_types import JOB_TYPES, StartRequest, Trigger
from atlas_dagster.resources.ledger import LedgerResource


def dagster_name(prefix: str, key: str) -> str:
    """Dagster names allow [A-Za-z0-9_]; config keys are slugs with '-' (never '_', so the
    mapping cannot collide)."""
    return f"{prefix}__{key.replace('-', '_')}"


def refresh_schedules(config: AtlasConfig, jobs: dict[str, object]) -> list[dg.ScheduleDefinition]:
    return [_refresh_schedule(entry, jobs[entry.job]) for entry in config.refresh_schedules]


def _refresh_schedule(entry: RefreshSchedule, job) -> dg.ScheduleDefinition:
    run_type = JOB_TYPES[entry.job]

    @dg.schedule(
        name=dagster_name("refresh", entry.key),
        cron_schedule=entry.cron,
        execution_timezone=entry.timezone,
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING
        if entry.enabled
        else dg.DefaultScheduleStatus.STOPPED,
        description=f"Refreshes {run_type.name} for every provider connection.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, ledger: LedgerResource):
        database = ledger
        keys = [c.key for c in database.config().provider_connections]
        ensure_partitions(context.instance, keys)
        ids = connection_ids(database.engine())
        book = ledger.ledger()
        requests = []
        for key in keys:
            request = StartRequest(
                run_type,
                connection_key=key,
                connection_id=ids[key],
                trigger=Trigger.SCHEDULE,
                initiator=dagster_name("refresh", entry.key),
            )
            started = book.open(request)
            if not started.created:
                continue  # an active run of this identity exists: it is the refresh
            requests.append(
                dg.RunRequest(
                    run_key=f"{entry.key}:{key}:{started.row.id}",
                    partition_key=key,
                    tags=request.tags(started.row.id),
                )
            )
        return requests or dg.SkipReason("every connection already has an active run")

    return _schedule
