"""atlas_dagster: an Intune/Entra cache, backups, verification and an operation ledger on Dagster."""
