"""Provider connections as Dagster partitions, kept in step with the config."""

from __future__ import annotations

import dagster as dg

from atlas_dagster.resources.database import DatabaseResource

provider_connection_partitions = dg.DynamicPartitionsDefinition(name="provider_connections")


def ensure_partitions(instance: dg.DagsterInstance, keys: list[str]) -> list[str]:
    """Add the partitions a start or schedule is about to use. Never removes any: only the
    config sync below does, so a start cannot take away another tenant's partition while one of
    its runs is in flight."""
    name = provider_connection_partitions.name
    assert name is not None
    added, _ = partition_changes(list(instance.get_dynamic_partitions(name)), keys)
    if added:
        try:
            instance.add_dynamic_partitions(name, added)
        except Exception:
            # Dagster checks, then inserts: a concurrent start or tick that added the same
            # partition between the two breaks its unique index. That is success for us.
            missing, _ = partition_changes(list(instance.get_dynamic_partitions(name)), keys)
            if missing:
                raise
    return added


def partition_changes(current: list[str], keys: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed): what makes the partitions equal to the config's connections."""
    have = set(current)
    return [k for k in dict.fromkeys(keys) if k not in have], sorted(have - set(keys))


@dg.sensor(
    name="provider_connection_partitions",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps the provider_connections partitions in step with atlas.yaml (the only "
    "place partitions are removed; their materialisations and cached rows stay).",
)
def provider_connection_partitions_sensor(
    context: dg.SensorEvaluationContext, database: DatabaseResource
):
    name = provider_connection_partitions.name
    assert name is not None
    keys = [c.key for c in database.config().provider_connections]
    added, removed = partition_changes(list(context.instance.get_dynamic_partitions(name)), keys)
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    if added:
        requests.append(provider_connection_partitions.build_add_request(added))
    if removed:
        requests.append(provider_connection_partitions.build_delete_request(removed))
    return dg.SensorResult(
        dynamic_partitions_requests=requests,
        skip_reason=None
        if requests
        else dg.SkipReason("partitions match the config's provider connections"),
    )
