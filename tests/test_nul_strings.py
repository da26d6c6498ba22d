"""Strings PostgreSQL cannot hold (U+0000) on both backends: payloads round-trip exactly through a
reversible escape, names are stored readable, and an object that cannot be stored fails alone."""

import json

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from atlas_dagster import analytics, db, schema
from atlas_dagster.assets.directory_groups import run_groups_sync
from atlas_dagster.assets.inventory import run_inventory_sync, sync_contract
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.resources.graph import client_for
from atlas_dagster.stores import backup_diff, backup_export, bulk
from atlas_dagster.stores import backups as store
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, content_hash

NUL, SYMBOL = "\x00", "\u2400"

# --- The escape (pure) -----------------------------------------------------------------------

# Text made of the characters the escape is about, so that every tricky sequence comes up.
tricky_text = st.text(alphabet=[NUL, SYMBOL, "0", "a", "\\", "u"], max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=12,
)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@given(json_values)
def test_the_json_escape_round_trips_exactly_and_leaves_no_nul(value):
    stored = bulk.encode_json(value)
    assert bulk.decode_json(stored) == value
    assert not any(NUL in s for s in _strings(stored))
    if not any(NUL in s or SYMBOL in s for s in _strings(value)):
        assert stored == value  # nearly every document is stored as it is


def test_the_escape_is_documented_and_a_dangling_escape_is_refused():
    assert bulk.encode_json({"a\x00": ["\u2400", "\x000"]}) == {"a␀0": ["␀␀", "␀00"]}
    with pytest.raises(ValueError, match="not an escaped"):
        bulk.decode_json("x\u2400")
    assert bulk.text_cell("a\x00b") == "a␀b"


def test_row_problem_names_a_nul_in_a_key_and_a_value_too_long_for_its_column():
    t = schema.inventory_items
    assert bulk.row_problem(t, {"external_id": "ok", "display_name": "a\x00b"}) is None
    assert bulk.row_problem(t, {"external_id": "a\x00b"}) == "external_id contains U+0000"
    assert bulk.row_problem(t, {"policy_type": "x" * 129}) == (
        "policy_type is longer than 128 characters"
    )


# --- Inventory -----------------------------------------------------------------------------


@pytest.fixture(name="env")
def env_fixture(contoso_env):
    return contoso_env


def _start(env, run_type, **kw):
    return start_operation(
        env["config"],
        run_type,
        defs=env["defs"],
        in_process=True,
        instance=env["instance"],
        **kw,
    ).row


def _plant_nuls(tenant) -> dict[str, str]:
    """A NUL in a conditional access description, one in a policy name, and a name that already
    holds the escape's own character: {contract key: id}."""
    ca = tenant.policies("conditional_access_policies")[0]["id"]
    tenant.update_policy("conditional_access_policies", ca, {"description": "block\x00legacy"})
    dc = tenant.policies("device_configurations")[0]["id"]
    tenant.update_policy("device_configurations", dc, {"displayName": "Baseline\x00 Win"})
    sc = tenant.policies("settings_catalog")[0]["id"]
    tenant.update_policy("settings_catalog", sc, {"name": "Odd \u24000 name\x00"})
    return {"conditional_access_policies": ca, "device_configurations": dc, "settings_catalog": sc}


def _cached(engine, contract_key: str) -> dict[str, sa.Row]:
    t = schema.inventory_items
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t).where(t.c.contract_key == contract_key, t.c.deleted_at.is_(None))
        )
        return {r.external_id: r for r in rows}


def test_nul_in_a_description_and_a_name_syncs_every_type_and_reads_back_exactly(env):
    engine, tenant = env["engine"], env["tenant"]
    planted = _plant_nuls(tenant)
    client = client_for(env["config"].connection("contoso"))
    conn_id = db.connection_ids(engine)["contoso"]
    summary = run_inventory_sync(engine, client, conn_id, None, threshold=1.0)
    assert [r.contract_key for r in summary.results if r.error or r.not_stored] == []
    for key in POLICY_CONTRACTS:
        graph = {o["id"]: o for o in tenant.policies(key)}
        cached = _cached(engine, key)
        assert set(cached) == set(graph), key  # every type was refreshed
        for external_id, row in cached.items():
            assert bulk.decode_json(row.payload) == graph[external_id], (key, external_id)
            # Hashes are of the true content, so the escape never reads as a change.
            assert row.content_hash == content_hash(CONTRACTS[key], graph[external_id])
    # Analysts get the exact payloads back from analytics.inventory too.
    frame = analytics.inventory(
        connection="contoso", database_url=env["config"].database_url
    ).set_index("external_id")
    for key, external_id in planted.items():
        graph = {o["id"]: o for o in tenant.policies(key)}
        assert frame.loc[external_id, "payload"] == graph[external_id], key
    names = {
        key: _cached(engine, key)[external_id].display_name for key, external_id in planted.items()
    }
    assert names["device_configurations"] == "Baseline␀ Win"
    assert names["settings_catalog"] == "Odd \u24000 name␀"
    again = run_inventory_sync(engine, client, conn_id, None, threshold=1.0).totals()
    assert (again["created"], again["updated"], again["deleted"]) == (0, 0, 0)


def test_an_object_that_cannot_be_stored_fails_alone_named_by_contract_and_id(env):
    engine, tenant = env["engine"], env["tenant"]
    _plant_nuls(tenant)
    template = tenant.policies("conditional_access_policies")[1]
    tenant.add_policy("conditional_access_policies", {**template, "id": "bad\x00id"})
    row = _start(env, "inventory.sync", connection="contoso")
    assert (row.status, row.outcome) == ("completed", "partially_succeeded"), row.failure_summary
    [entry] = row.failure_summary
    assert entry["reason_code"] == "provider_bad_response"
    assert entry["contract_key"] == "conditional_access_policies"
    assert "1 object(s) could not be stored" in entry["message"]
    assert "bad␀id (external_id contains U+0000)" in entry["message"]
    assert row.summary_counts["objects_not_stored"] == 1
    for key in POLICY_CONTRACTS:
        graph = {o["id"] for o in tenant.policies(key)} - {"bad\x00id"}
        assert set(_cached(engine, key)) == graph, key


def test_text_utf8_cannot_encode_fails_its_object_alone(env):
    # A lone surrogate (Graph may send the escape "\ud800") has no UTF-8 form: neither backend
    # can store it. The simulator cannot serve one, so the objects are given directly.
    engine = env["engine"]
    objects = env["tenant"].policies("conditional_access_policies")
    objects[1]["description"] = "\ud800"
    result = sync_contract(
        engine,
        db.connection_ids(engine)["contoso"],
        CONTRACTS["conditional_access_policies"],
        iter(objects),
        threshold=1.0,
        listed_again=set,
    )
    assert [(i, why.split(":")[0]) for i, why in result.not_stored] == [
        (objects[1]["id"], "UnicodeEncodeError")
    ]
    assert set(_cached(engine, "conditional_access_policies")) == {
        o["id"] for o in objects if o is not objects[1]
    }


def test_a_nul_in_a_group_is_stored_readable_and_its_json_exactly(env):
    engine, tenant = env["engine"], env["tenant"]
    group_id = next(iter(tenant.groups()))["id"]
    tenant.update_group(group_id, {"displayName": "Staff\x00 A", "groupTypes": ["Uni\x00fied"]})
    client = client_for(env["config"].connection("contoso"))
    run_groups_sync(engine, client, db.connection_ids(engine)["contoso"])
    g = schema.directory_groups
    with engine.connect() as conn:
        row = conn.execute(sa.select(g).where(g.c.group_id == group_id)).one()
    assert row.display_name == "Staff␀ A"
    assert bulk.decode_json(row.group_types) == ["Uni\x00fied"]


# --- Backups -------------------------------------------------------------------------------


def test_a_backup_with_nul_in_names_succeeds_and_exports_and_diffs_the_exact_original(
    env, tmp_path
):
    engine, tenant = env["engine"], env["tenant"]
    planted = _plant_nuls(tenant)
    first = _start(env, "backup_schedule.run_now", schedule="contoso-nightly")
    assert (first.status, first.outcome) == ("completed", "succeeded"), first.failure_summary
    set_a = first.context["backup_schedule_run_id"]
    items = store.set_items(engine, set_a)
    dc = planted["device_configurations"]
    assert items[("device_configurations", dc)].display_name == "Baseline␀ Win"

    out = tmp_path / "export"
    backup_export.export_set(engine, set_a, out)
    manifest = json.loads((out / backup_export.MANIFEST).read_text())
    files = {(f["contract_key"], f["external_id"]): out / f["file"] for f in manifest["files"]}
    for key, external_id in planted.items():
        [graph] = [o for o in tenant.policies(key) if o["id"] == external_id]
        text = files[(key, external_id)].read_text(encoding="utf-8")
        assert json.loads(text) == graph
        assert text == json.dumps(graph, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    tenant.update_policy("device_configurations", dc, {"displayName": "Baseline\x00 Win 2"})
    second = _start(env, "backup_schedule.run_now", schedule="contoso-nightly")
    diff = backup_diff.diff_sets(engine, set_a, second.context["backup_schedule_run_id"])
    [change] = diff.changed
    assert (change.policy.contract_key, change.policy.external_id) == ("device_configurations", dc)
    assert [(f.path, f.before, f.after) for f in change.fields] == [
        ("displayName", "Baseline\x00 Win", "Baseline\x00 Win 2")
    ]
