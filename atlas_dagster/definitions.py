"""The code location: ``defs`` (loaded by ``dagster dev -w workspace.yaml``).

Loading does no network I/O and no Graph calls: config is read from disk, everything else
happens when runs, sensors or schedules execute.
"""

from __future__ import annotations

import dagster as dg

from atlas_dagster import connections, mirror
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.ledger import LedgerResource


def build_definitions() -> dg.Definitions:
    database = DatabaseResource()
    return dg.Definitions(
        sensors=[
            *mirror.mirror_sensors,
            mirror.operation_runs_reconciler,
            connections.provider_connection_partitions_sensor,
        ],
        resources={
            "database": database,
            "ledger": LedgerResource(database=database),
        },
    )


defs = build_definitions()
