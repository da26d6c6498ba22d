"""Freshness checks read the cache only; partitions follow the config."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import schema
from atlas_dagster.assets.directory_groups import run_groups_sync
from atlas_dagster.assets.inventory import inventory_fresh
from atlas_dagster.connections import (
    ensure_partitions,
    provider_connection_partitions,
    provider_connection_partitions_sensor,
)
from atlas_dagster.db import connection_ids
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import client_for
from tests.conftest import write_config


def test_inventory_freshness_fails_until_synced_and_after_26_hours(
    tmp_path, sqlite_url, contoso_sim
):
    from atlas_dagster.assets.inventory import run_inventory_sync

    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    database = DatabaseResource(config_path=str(cfg))
    engine = database.engine()
    never = inventory_fresh(dg.build_asset_check_context(), database=database)
    assert not never.passed
    assert never.metadata["stale_connections"].value == ["contoso"]

    client = client_for(database.config().connection("contoso"))
    run_inventory_sync(engine, client, connection_ids(engine)["contoso"], None)
    assert inventory_fresh(dg.build_asset_check_context(), database=database).passed

    t = schema.inventory_items
    with engine.begin() as conn:
        conn.execute(t.update().values(last_seen_at=datetime.now(UTC) - timedelta(hours=27)))
    stale = inventory_fresh(dg.build_asset_check_context(), database=database)
    assert not stale.passed and stale.metadata["hours_since_refresh"].value["contoso"] > 26


def test_groups_sync_makes_groups_fresh(tmp_path, sqlite_url, contoso_sim):
    from atlas_dagster.assets.directory_groups import directory_groups_fresh

    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    database = DatabaseResource(config_path=str(cfg))
    assert not directory_groups_fresh(dg.build_asset_check_context(), database=database).passed
    engine = database.engine()
    run_groups_sync(
        engine,
        client_for(database.config().connection("contoso")),
        connection_ids(engine)["contoso"],
    )
    assert directory_groups_fresh(dg.build_asset_check_context(), database=database).passed


def _tick(context, instance) -> None:
    """Evaluate the partitions sensor and apply its requests, as the sensor daemon does."""
    result = provider_connection_partitions_sensor(context)
    for request in result.dynamic_partitions_requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def test_partitions_follow_the_config_and_removed_data_stays(tmp_path, sqlite_url):
    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    extra = "  - key: fabrikam\n    simulated: {profile: small, seed: 9}\n"
    text = cfg.read_text().replace("backup_schedules:", extra + "backup_schedules:")
    cfg.write_text(text)
    database = DatabaseResource(config_path=str(cfg))
    name = provider_connection_partitions.name
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"database": database})
        _tick(context, instance)
        assert sorted(instance.get_dynamic_partitions(name)) == ["contoso", "fabrikam"]
        database.engine()  # a run or a start writes the connection rows
        # fabrikam leaves the config: its partition goes, its database row stays.
        cfg.write_text(text.replace(extra, ""))
        context = dg.build_sensor_context(
            instance=instance, resources={"database": DatabaseResource(config_path=str(cfg))}
        )
        _tick(context, instance)
        assert instance.get_dynamic_partitions(name) == ["contoso"]
        # A start only ever adds its own key.
        assert ensure_partitions(instance, ["contoso"]) == []
        assert instance.get_dynamic_partitions(name) == ["contoso"]
    with database.engine().connect() as conn:
        keys = {r.key for r in conn.execute(sa.select(schema.provider_connections.c.key))}
    assert keys == {"contoso", "fabrikam"}


def test_a_partition_another_start_added_in_the_meantime_is_not_an_error():
    """Dagster reads, then inserts: a concurrent start that inserts the same key in between
    breaks the unique index under this start's insert. The key is there, which is all a start
    needs."""
    name = provider_connection_partitions.name
    with dg.instance_for_test() as instance:
        real_add = instance.add_dynamic_partitions

        def raced(partitions_def_name, partition_keys):
            real_add(partitions_def_name, partition_keys)  # the other start wins
            raise sa.exc.IntegrityError("INSERT INTO dynamic_partitions", {}, Exception("UNIQUE"))

        instance.add_dynamic_partitions = raced
        assert ensure_partitions(instance, ["contoso"]) == ["contoso"]
        assert instance.get_dynamic_partitions(name) == ["contoso"]


def test_a_failed_partition_add_that_left_the_key_missing_is_raised():
    with dg.instance_for_test() as instance:

        def broken(partitions_def_name, partition_keys):
            raise RuntimeError("storage down")

        instance.add_dynamic_partitions = broken
        with pytest.raises(RuntimeError, match="storage down"):
            ensure_partitions(instance, ["contoso"])
