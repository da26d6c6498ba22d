"""analytics: the views as DataFrames, filtered by connection, type and time, reading only."""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from atlas_dagster import analytics, db
from atlas_dagster.assets.directory_groups import run_groups_sync
from atlas_dagster.assets.inventory import run_inventory_sync
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import client_for
from tests.conftest import write_config


def test_views_as_dataframes(tmp_path, database_url, contoso_sim):
    cfg = write_config(tmp_path / "atlas.yaml", database_url)
    database = DatabaseResource(config_path=str(cfg))
    engine = database.engine()
    client = client_for(database.config().connection("contoso"))
    conn_id = db.connection_ids(engine)["contoso"]
    run_groups_sync(engine, client, conn_id)
    run_inventory_sync(engine, client, conn_id, None)
    ledger = OperationLedger(engine)
    row = ledger.start(
        "inventory.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="a"
    ).row
    ledger.complete(row.id, "succeeded")
    ledger.start(
        "directory_groups.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="a"
    )
    with engine.connect() as conn:
        tables_before = {
            name: conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar()
            for name in ("operation_runs", "inventory_items", "directory_groups")
        }

    everything = analytics.inventory(database_url=database_url)
    settings = analytics.inventory(
        connection="contoso", policy_type="settings_catalog", database_url=database_url
    )
    assert len(everything) == tables_before["inventory_items"]
    assert 0 < len(settings) < len(everything) and set(settings["policy_type"]) == {
        "settings_catalog"
    }
    assert analytics.inventory(connection="nobody", database_url=database_url).empty

    targets = analytics.assignments(connection="contoso", database_url=database_url)
    named = targets.dropna(subset=["group_name"])
    group = named["group_name"].iloc[0]
    by_name = analytics.assignments(group=group, database_url=database_url)
    assert len(by_name) > 0 and set(by_name["group_name"]) == {group}

    runs = analytics.operation_runs(connection="contoso", database_url=database_url)
    assert list(runs["type"]) == ["directory_groups.sync", "inventory.sync"]  # newest first
    assert list(
        analytics.operation_runs(type="inventory.sync", database_url=database_url)["outcome"]
    ) == ["succeeded"]
    future = datetime.now(UTC) + timedelta(days=1)
    assert analytics.operation_runs(since=future, database_url=database_url).empty
    assert (
        len(analytics.operation_runs(until=future, status="queued", database_url=database_url)) == 1
    )

    with engine.connect() as conn:
        for name, count in tables_before.items():
            assert conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar() == count
