"""The code location: ``defs`` (loaded by ``dagster dev -w workspace.yaml``).

Loading does no network I/O and no Graph calls: the config is read from disk, and everything else
happens when runs, sensors or schedules execute.
"""

import dagster as dg

from atlas_dagster import connections
from atlas_dagster.assets.backups import backup_job, backup_schedules, backups
from atlas_dagster.assets.directory_groups import (
    directory_groups,
    directory_groups_fresh,
    directory_groups_sync_job,
)
from atlas_dagster.assets.inventory import inventory, inventory_fresh, inventory_sync_job
from atlas_dagster.assets.restore import (
    restore_execute_job,
    restore_execution,
    restore_plan,
    restore_plan_job,
)
from atlas_dagster.assets.verification import (
    provider_connection_checks,
    provider_connection_verify_job,
)
from atlas_dagster.config import AtlasConfig, ConfigError
from atlas_dagster.db import cached_config
from atlas_dagster.ledger.sensors import mirror_sensors, operation_runs_reconciler
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.schedules import refresh_schedules

JOBS = [
    inventory_sync_job,
    directory_groups_sync_job,
    provider_connection_verify_job,
    backup_job,
    restore_plan_job,
    restore_execute_job,
]


def build_definitions(config: AtlasConfig | None = None) -> dg.Definitions:
    if config is None:
        try:
            config = cached_config()
        except ConfigError as exc:
            # The UI shows this one line as the code location's load error.
            raise dg.DagsterInvariantViolationError(str(exc)) from None
    database = DatabaseResource()
    return dg.Definitions(
        assets=[
            inventory,
            directory_groups,
            provider_connection_checks,
            backups,
            restore_plan,
            restore_execution,
        ],
        asset_checks=[inventory_fresh, directory_groups_fresh],
        jobs=JOBS,
        schedules=[
            *refresh_schedules(config, {j.name: j for j in JOBS}),
            *backup_schedules(config),
        ],
        sensors=[
            *mirror_sensors,
            operation_runs_reconciler,
            connections.provider_connection_partitions_sensor,
        ],
        # One step per job: run it in the run worker itself, so stopping the worker stops the
        # work (a per-step process would outlive a killed worker) and no process starts per step.
        executor=dg.in_process_executor,
        resources={
            "database": database,
            "ledger": LedgerResource(),
            "graph": GraphClientResource(),
        },
    )


defs = build_definitions()
