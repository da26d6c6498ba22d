"""Provider connections as Dagster partitions, kept in step with the config."""

from __future__ import annotations

import dagster as dg

from atlas_dagster.resources.database import DatabaseResource

provider_connection_partitions = dg.DynamicPartitionsDefinition(name="provider_connections")


def sync_partitions(instance: dg.DagsterInstance, keys: list[str]) -> tuple[list[str], list[str]]:
    """Add the config's connections as partitions and drop the ones no longer configured
    (their materialisations and cached rows stay). Returns (added, removed)."""
    name = provider_connection_partitions.name
    assert name is not None
    current = set(instance.get_dynamic_partitions(name))
    added = [k for k in keys if k not in current]
    removed = sorted(current - set(keys))
    if added:
        instance.add_dynamic_partitions(name, added)
    for key in removed:
        instance.delete_dynamic_partition(name, key)
    return added, removed


@dg.sensor(
    name="provider_connection_partitions",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps the provider_connections partitions in step with atlas.yaml.",
)
def provider_connection_partitions_sensor(
    context: dg.SensorEvaluationContext, database: DatabaseResource
):
    keys = [c.key for c in database.config().provider_connections]
    added, removed = sync_partitions(context.instance, keys)
    return dg.SkipReason(f"partitions added: {added or 'none'}; removed: {removed or 'none'}")
