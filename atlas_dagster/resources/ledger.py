"""The operation ledger as a Dagster resource: a thin adapter over atlas_dagster.ledger.store."""

from __future__ import annotations

from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.resources.database import DatabaseResource


class LedgerResource(DatabaseResource):
    """The database resource that also hands out the ledger (used by jobs, sensors and the
    schedules). It extends the database resource rather than nesting one: Dagster initialises
    nested resources through a deprecated context property."""

    def ledger(self) -> OperationLedger:
        return OperationLedger(self.engine())
