"""Inventory and directory groups against the simulator: the cache equals the tenant after every
successful sync, and loses nothing after a failed one."""

import random
import sys

import dagster as dg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_dagster import db, schema
from atlas_dagster.assets.common import Progress
from atlas_dagster.assets.directory_groups import run_groups_sync
from atlas_dagster.assets.inventory import run_inventory_sync, sync_contract
from atlas_dagster.reasons import AtlasError
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import client_for
from atlas_dagster.simulator import (
    FaultPlan,
)
from atlas_dagster.simulator import server as simulator_server
from atlas_dagster.stores import bulk, groups
from atlas_dagster.stores.groups import stored_delta_link
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, content_hash
from tests.conftest import write_config


@pytest.fixture
def setup(tmp_path, database_url, monkeypatch, contoso_sim):
    # Delta pages of 10 and batches of 4 pages (40 rows): every groups sync here goes through
    # the writer's pipeline many times.
    monkeypatch.setattr(simulator_server, "DELTA_PAGE_MAX", 10)
    monkeypatch.setattr(groups, "FLUSH_ROWS", 37)
    cfg = write_config(tmp_path / "atlas.yaml", database_url, "mass_deletion_threshold: 1.0\n")
    database = DatabaseResource(config_path=str(cfg))
    engine = database.engine()
    sim = contoso_sim
    client = client_for(database.config().connection("contoso"))
    # Faults count requests, not time: every retry still happens, without waiting it out. Pacing
    # is skipped too: unslept, it would leave the process-wide Intune bucket in debt for the
    # next test of this worker (pacing has its own tests in test_graph_client).
    monkeypatch.setattr(client, "_sleep", lambda seconds: None)
    monkeypatch.setattr(client, "_pace", lambda contract, units: None)
    yield {
        "engine": engine,
        "sim": sim,
        "client": client,
        "conn_id": db.connection_ids(engine)["contoso"],
        "database": database,
    }


def cached_items(engine, conn_id) -> dict[tuple[str, str], str]:
    t = schema.inventory_items
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.contract_key, t.c.external_id, t.c.content_hash).where(
                t.c.provider_connection_id == conn_id, t.c.deleted_at.is_(None)
            )
        )
        return {(r.contract_key, r.external_id): r.content_hash for r in rows}


def tenant_items(tenant) -> dict[tuple[str, str], str]:
    out = {}
    for key in POLICY_CONTRACTS:
        for obj in tenant.policies(key):
            out[(key, str(obj["id"]))] = content_hash(CONTRACTS[key], obj)
    return out


def cached_assignments(engine, conn_id) -> set[tuple]:
    a = schema.inventory_assignments
    with engine.connect() as conn:
        return {
            (r.contract_key, r.external_id, r.target_type, r.group_id, r.filter_id, r.intent)
            for r in conn.execute(sa.select(a).where(a.c.provider_connection_id == conn_id))
        }


def tenant_assignments(tenant) -> set[tuple]:
    from graph_contracts import extract_assignments

    out = set()
    for key in POLICY_CONTRACTS:
        for obj in tenant.policies(key):
            for a in extract_assignments(obj):
                out.add(
                    (
                        key,
                        str(obj["id"]),
                        a["target_type"],
                        a["group_id"],
                        a["filter_id"],
                        a["intent"],
                    )
                )
    return out


def cached_groups(engine, conn_id) -> dict[str, str | None]:
    g = schema.directory_groups
    with engine.connect() as conn:
        return {
            r.group_id: r.display_name
            for r in conn.execute(
                sa.select(g.c.group_id, g.c.display_name).where(
                    g.c.provider_connection_id == conn_id, g.c.deleted_at.is_(None)
                )
            )
        }


def tenant_groups(tenant) -> dict[str, str | None]:
    return {str(g["id"]): g.get("displayName") for g in tenant.groups()}


def test_full_sync_caches_every_policy_with_assignments(setup):
    summary = run_inventory_sync(setup["engine"], setup["client"], setup["conn_id"], None)
    tenant = setup["sim"].tenant
    assert cached_items(setup["engine"], setup["conn_id"]) == tenant_items(tenant)
    assert cached_assignments(setup["engine"], setup["conn_id"]) == tenant_assignments(tenant)
    assert summary.totals()["created"] == len(tenant_items(tenant))
    assert all(r.complete for r in summary.results)
    # A second sync of an unchanged tenant changes nothing.
    again = run_inventory_sync(setup["engine"], setup["client"], setup["conn_id"], None)
    assert (again.totals()["created"], again.totals()["updated"], again.totals()["deleted"]) == (
        0,
        0,
        0,
    )


def test_an_object_without_an_id_fails_the_type_and_every_object_counted_is_stored(setup):
    engine, conn_id, sim = setup["engine"], setup["conn_id"], setup["sim"]
    objects = [dict(o) for o in sim.tenant.policies("device_configurations")][:3]
    objects.insert(2, {"displayName": "no id"})
    result = sync_contract(
        engine,
        conn_id,
        CONTRACTS["device_configurations"],
        iter(objects),
        threshold=1.0,
        listed_again=set,
    )
    assert result.error is not None and result.error.reason_code == "provider_bad_response"
    stored = {key for key, _ in cached_items(engine, conn_id).items()}
    assert {("device_configurations", i) for i in result.created} == stored
    assert len(stored) == 3


def test_403_on_one_type_fails_only_that_type_and_deletes_nothing(setup):
    run_inventory_sync(setup["engine"], setup["client"], setup["conn_id"], None)
    before = cached_items(setup["engine"], setup["conn_id"])
    sim = setup["sim"]
    sim.granted_roles = [r for r in sim.granted_roles if r != "DeviceManagementApps.Read.All"]
    summary = run_inventory_sync(setup["engine"], setup["client"], setup["conn_id"], None)
    failed = {r.contract_key: r.error.reason_code for r in summary.results if r.error}
    apps = {
        k for k in POLICY_CONTRACTS if "DeviceManagementApps.Read.All" in CONTRACTS[k].permissions
    }
    assert failed == {k: "provider_permission_denied" for k in apps}
    assert cached_items(setup["engine"], setup["conn_id"]) == before
    t = schema.provider_connection_checks
    with setup["engine"].connect() as conn:
        checks = {
            r.contract_key: r.status
            for r in conn.execute(
                sa.select(t).where(t.c.provider_connection_id == setup["conn_id"])
            )
        }
    assert checks == {k: "missing_permission" for k in apps}


def test_mass_deletion_guard_holds_deletions_back(setup):
    run_inventory_sync(setup["engine"], setup["client"], setup["conn_id"], None)
    tenant = setup["sim"].tenant
    key = max(POLICY_CONTRACTS, key=lambda k: len(tenant.policies(k)))
    for obj in list(tenant.policies(key)):
        tenant.delete_policy(key, obj["id"])
    summary = run_inventory_sync(
        setup["engine"], setup["client"], setup["conn_id"], None, threshold=0.5
    )
    result = next(r for r in summary.results if r.contract_key == key)
    assert result.held_back and not result.deleted
    cached = {k for k in cached_items(setup["engine"], setup["conn_id"]) if k[0] == key}
    assert len(cached) == len(result.held_back)


def test_groups_delta_full_then_incremental_then_resync(setup):
    engine, client, conn_id, sim = setup["engine"], setup["client"], setup["conn_id"], setup["sim"]
    first = run_groups_sync(engine, client, conn_id)
    assert first.mode == "full"
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)
    rng = random.Random(5)
    sim.tenant.mutate(rng, 20)
    second = run_groups_sync(engine, client, conn_id)
    assert second.mode == "incremental"
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)
    sim.stats.reset()
    before = client.stats.requests
    run_groups_sync(engine, client, conn_id)
    assert client.stats.requests - before <= 2  # a no-change incremental sync
    gone = next(iter(tenant_groups(sim.tenant)))
    sim.tenant.delete_group(gone)
    sim.expire_delta_tokens()
    third = run_groups_sync(engine, client, conn_id)
    assert third.mode == "resync"
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)
    assert gone not in cached_groups(engine, conn_id)


def test_a_batch_that_fails_to_write_fails_the_sync_and_nothing_is_written_after_it(
    setup, monkeypatch
):
    engine, client, conn_id, sim = setup["engine"], setup["client"], setup["conn_id"], setup["sim"]
    execute, calls = bulk.PreparedUpsert.execute, []

    def fail_second_batch(self, conn):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        execute(self, conn)

    monkeypatch.setattr(bulk.PreparedUpsert, "execute", fail_second_batch)
    with pytest.raises(RuntimeError, match="disk full"):
        run_groups_sync(engine, client, conn_id)
    assert len(calls) == 2  # batches after the failed one were not written
    assert len(cached_groups(engine, conn_id)) == 40  # the first batch
    assert stored_delta_link(engine, conn_id) is None  # so the next sync reads everything again
    monkeypatch.setattr(bulk.PreparedUpsert, "execute", execute)
    assert run_groups_sync(engine, client, conn_id).mode == "full"
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)


def test_groups_sync_switches_threads_promptly_while_it_reads_and_restores_the_default(
    setup,
):
    engine, client, conn_id = setup["engine"], setup["client"], setup["conn_id"]
    default, seen = sys.getswitchinterval(), []

    class Recording:
        stats = client.stats

        def delta(self, key, link):
            for page in client.delta(key, link):
                seen.append(sys.getswitchinterval())
                yield page
            raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError):
        run_groups_sync(engine, Recording(), conn_id)
    assert seen and max(seen) <= 0.0005 < default
    assert sys.getswitchinterval() == default  # also after a failed sync


def test_readable_assignments_resolve_group_and_filter_names_from_cache(setup):
    engine, client, conn_id, sim = setup["engine"], setup["client"], setup["conn_id"], setup["sim"]
    run_groups_sync(engine, client, conn_id)
    run_inventory_sync(engine, client, conn_id, None)
    names = tenant_groups(sim.tenant)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT group_id, group_name, filter_id, filter_name FROM v_assignments_readable"
        ).fetchall()
    with_groups = [r for r in rows if r.group_id]
    assert with_groups
    assert all(r.group_name == names[r.group_id] for r in with_groups if r.group_id in names)
    assert all(r.filter_name for r in rows if r.filter_id)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rounds=st.lists(
        st.tuples(
            st.integers(0, 2**16),
            st.integers(1, 15),
            st.sampled_from(["none", "429", "503", "malformed", "403"]),
        ),
        min_size=2,
        max_size=4,
    )
)
def test_cache_equals_tenant_after_each_sync_and_keeps_everything_after_failures(setup, rounds):
    engine, client, conn_id, sim = setup["engine"], setup["client"], setup["conn_id"], setup["sim"]
    all_roles = list(sim.granted_roles)
    run_inventory_sync(engine, client, conn_id, None)
    run_groups_sync(engine, client, conn_id)
    for seed, n, fault in rounds:
        sim.tenant.mutate(random.Random(seed), n)
        before_items = cached_items(engine, conn_id)
        before_groups = cached_groups(engine, conn_id)
        sim.faults = FaultPlan()
        sim.granted_roles = all_roles
        if fault == "429":
            sim.faults = FaultPlan(throttle_every=7, retry_after="0.01")
        elif fault == "503":
            sim.faults = FaultPlan(unavailable_every=9)
        elif fault == "malformed":
            sim.faults = FaultPlan(malformed_every=5)
        elif fault == "403":
            sim.granted_roles = [
                r for r in all_roles if r != "DeviceManagementConfiguration.Read.All"
            ]
        try:
            summary = run_inventory_sync(engine, client, conn_id, None)
            failed = {r.contract_key for r in summary.results if r.error}
        except AtlasError:
            failed = set(POLICY_CONTRACTS)
        after = cached_items(engine, conn_id)
        expected = tenant_items(sim.tenant)
        for key in POLICY_CONTRACTS:
            mine = {k: v for k, v in after.items() if k[0] == key}
            if key in failed:
                # A failed type deletes nothing: every row cached before is still there.
                assert {k for k in before_items if k[0] == key} <= set(mine)
            else:
                assert mine == {k: v for k, v in expected.items() if k[0] == key}
        try:
            run_groups_sync(engine, client, conn_id)
            assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)
        except AtlasError:
            # Nothing the tenant still has was dropped from the cache.
            still_there = set(before_groups) & set(tenant_groups(sim.tenant))
            assert still_there <= set(cached_groups(engine, conn_id))
        sim.faults = FaultPlan()
        sim.granted_roles = all_roles
    run_inventory_sync(engine, client, conn_id, None)
    run_groups_sync(engine, client, conn_id)
    assert cached_items(engine, conn_id) == tenant_items(sim.tenant)
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)


def test_inventory_job_records_counts_and_partial_outcome(setup, tmp_path):
    from atlas_dagster.connections import ensure_partitions
    from atlas_dagster.definitions import build_definitions
    from atlas_dagster.ledger.start import start_operation

    database = setup["database"]
    config = database.config()
    sim = setup["sim"]
    sim.granted_roles = [r for r in sim.granted_roles if r != "DeviceManagementApps.Read.All"]
    defs = build_definitions(config)
    with dg.instance_for_test() as instance:
        ensure_partitions(instance, ["contoso"])
        outcome = start_operation(
            config,
            "inventory.sync",
            defs=defs,
            connection="contoso",
            in_process=True,
            instance=instance,
        )
        messages = [
            e.user_message
            for e in instance.all_logs(outcome.row.dagster_run_id)
            if e.dagster_event is None
        ]
    row = outcome.row
    assert (row.status, row.outcome) == ("completed", "partially_succeeded")
    assert {f["reason_code"] for f in row.failure_summary} == {"provider_permission_denied"}
    assert row.summary_counts["items"] == len(cached_items(setup["engine"], setup["conn_id"]))
    # Every type's line reaches the run's log, in far fewer events than types (each is a write).
    lines = [line for m in messages for line in m.splitlines() if " items, +" in line]
    assert sorted(line.split(":")[0] for line in lines) == sorted(POLICY_CONTRACTS)
    assert any("(provider_permission_denied)" in line for line in lines)
    assert len([m for m in messages if " items, +" in m]) < len(lines)


def test_progress_lines_are_batched_but_none_is_lost_or_reordered():
    sent: list[str] = []

    class Log:
        def info(self, msg: str) -> None:
            sent.append(msg)

    with Progress(Log(), every_s=3600) as progress:
        for i in range(5):
            progress.add(f"type{i}")
        assert sent == []
    assert sent == ["type0\ntype1\ntype2\ntype3\ntype4"]
    sent.clear()
    # Once the interval has passed, each line goes at once: a slow sync shows its progress.
    with Progress(Log(), every_s=0) as progress:
        progress.add("a")
        progress.add("b")
        assert sent == ["a", "b"]
    # A sync that fails still logs what it read before the failure.
    sent.clear()
    with pytest.raises(RuntimeError), Progress(Log(), every_s=3600) as progress:
        progress.add("read before the failure")
        raise RuntimeError("fatal")
    assert sent == ["read before the failure"]
    with Progress(None) as progress:
        progress.add("nowhere")  # no log: nothing to do


def test_a_delta_link_older_than_seven_days_is_not_tried(setup):
    from datetime import UTC, datetime, timedelta

    engine, client, conn_id, sim = setup["engine"], setup["client"], setup["conn_id"], setup["sim"]
    run_groups_sync(engine, client, conn_id)
    gone = next(iter(tenant_groups(sim.tenant)))
    sim.tenant.delete_group(gone, permanent=True)
    t = schema.directory_delta_links
    with engine.begin() as conn:
        conn.execute(t.update().values(updated_at=datetime.now(UTC) - timedelta(days=8)))
    result = run_groups_sync(engine, client, conn_id)
    assert result.mode == "resync"
    assert gone not in cached_groups(engine, conn_id)
    assert cached_groups(engine, conn_id) == tenant_groups(sim.tenant)
