"""The mass-deletion guard (DESIGN §6, §8): a hold partially succeeds with ``mass_deletion_held``
and lists what it held; ``accept_deletions`` applies exactly that list, nothing newer; a listing
that ended early deletes only what a second listing confirms gone."""

from types import SimpleNamespace

import dagster as dg
import sqlalchemy as sa

from atlas_dagster import schema
from atlas_dagster.assets.inventory import holds_deletions, last_hold
from tests.test_nul_strings import _start, env_fixture  # noqa: F401  (the fixture `env`)


def test_the_guard_holds_at_the_threshold_and_only_from_a_minimum_count():
    assert holds_deletions(10, 20, 0.5)  # exactly the threshold is held
    assert not holds_deletions(9, 20, 0.5)
    assert holds_deletions(6, 20, 0.3)  # 0.3 * 20 is 6.000000000000001 in floats
    assert not holds_deletions(1, 1, 0.5)  # one policy of one is no mass deletion
    assert not holds_deletions(4, 4, 0.5)
    assert holds_deletions(5, 5, 1.0)


def test_the_last_hold_is_decided_per_type_by_the_newest_sync_that_held_or_accepted_it():
    def run(run_id, **context):
        return SimpleNamespace(id=run_id, context=context)

    class Ledger:
        def list(self, *, provider_connection_id, type):
            return [  # newest first
                run(5, accepted_deletions={"a": ["a1"]}),
                run(4, held_deletions={"b": ["b2"]}),
                run(3),
                run(2, held_deletions={"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}),
            ]

    current = SimpleNamespace(id=6, provider_connection_id=1, type="inventory.sync")
    # a: accepted by run 5 (spent); b: run 4's newer hold; c: still run 2's.
    assert last_hold(Ledger(), current) == {"b": ["b2"], "c": ["c1"]}
    assert last_hold(Ledger(), SimpleNamespace(**{**vars(current), "id": 3})) == {
        "a": ["a1", "a2"],
        "b": ["b1"],
        "c": ["c1"],
    }


def _grow(tenant, key: str, size: int) -> None:
    for _ in range(size - len(tenant.stored_policies(key))):
        tenant.add_policy(key)


def _active(engine, key: str) -> set[str]:
    t = schema.inventory_items
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.select(t.c.external_id).where(t.c.contract_key == key, t.c.deleted_at.is_(None))
            ).scalars()
        )


def _sync(env, **kw):
    return _start(env, "inventory.sync", connection="contoso", **kw)


def _mass_deletion_check(env) -> dg.AssetCheckEvaluation:
    key = dg.AssetCheckKey(dg.AssetKey("inventory"), "mass_deletion")
    [record] = env["instance"].event_log_storage.get_asset_check_execution_history(key, limit=1)
    return record.event.dagster_event.event_specific_data


def test_a_held_deletion_partially_succeeds_says_how_to_accept_it_and_lists_the_ids(env):
    engine, tenant = env["engine"], env["tenant"]
    _grow(tenant, "device_configurations", 20)
    assert _sync(env).outcome == "succeeded"
    gone = [o["id"] for o in tenant.policies("device_configurations")][:16]
    for external_id in gone:
        tenant.delete_policy("device_configurations", external_id)
    small = tenant.policies("compliance_policies")[0]["id"]
    tenant.delete_policy("compliance_policies", small)

    row = _sync(env)
    assert (row.status, row.outcome) == ("completed", "partially_succeeded")
    [entry] = row.failure_summary
    assert (entry["reason_code"], entry["contract_key"]) == (
        "mass_deletion_held",
        "device_configurations",
    )
    assert "16 of 20 device_configurations objects (80%)" in entry["message"]
    assert (
        "atlas-dagster start inventory.sync --connection contoso --accept-deletions"
        in entry["message"]
    )
    assert set(row.context["held_deletions"]["device_configurations"]) == set(gone)
    assert (row.summary_counts["deletions_held_back"], row.summary_counts["deleted"]) == (16, 1)
    assert len(_active(engine, "device_configurations")) == 20  # held back: still cached
    assert small not in _active(engine, "compliance_policies")  # the rest was applied
    check = _mass_deletion_check(env)
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.WARN)

    # Every later sync holds them again until someone accepts them.
    again = _sync(env)
    assert [f["reason_code"] for f in again.failure_summary] == ["mass_deletion_held"]
    assert len(_active(engine, "device_configurations")) == 20


def test_accepting_applies_exactly_the_held_ids_still_gone_and_holds_newer_ones(env):
    engine, tenant = env["engine"], env["tenant"]
    _grow(tenant, "device_configurations", 20)
    _sync(env)
    objects = tenant.policies("device_configurations")
    first, rest = objects[:10], objects[10:]
    for obj in first:
        tenant.delete_policy("device_configurations", obj["id"])
    held = _sync(env)  # 10 of 20: exactly the threshold
    assert set(held.context["held_deletions"]["device_configurations"]) == {o["id"] for o in first}
    back = first[0]
    tenant.add_policy("device_configurations", back)  # one of the held came back
    for obj in rest:
        tenant.delete_policy("device_configurations", obj["id"])  # newer absences

    accepting = _sync(env, accept_deletions=True)
    assert accepting.context["accept_deletions"] is True
    applied = {o["id"] for o in first[1:]}
    assert set(accepting.context["accepted_deletions"]["device_configurations"]) == applied
    assert set(accepting.context["held_deletions"]["device_configurations"]) == {
        o["id"] for o in rest
    }
    assert accepting.outcome == "partially_succeeded"
    assert [f["reason_code"] for f in accepting.failure_summary] == ["mass_deletion_held"]
    assert _active(engine, "device_configurations") == {back["id"]} | {o["id"] for o in rest}

    # Accepting again takes the newest hold (the newer absences), and only it.
    last = _sync(env, accept_deletions=True)
    assert (last.outcome, last.failure_summary) == ("succeeded", [])
    assert _active(engine, "device_configurations") == {back["id"]}
    assert _mass_deletion_check(env).passed


def test_one_policy_of_one_gone_is_deleted(env):
    engine, tenant = env["engine"], env["tenant"]
    _sync(env)
    profiles = [o["id"] for o in tenant.policies("autopilot_profiles")]
    for external_id in profiles[1:]:
        tenant.delete_policy("autopilot_profiles", external_id)
    assert _sync(env).outcome == "succeeded"
    tenant.delete_policy("autopilot_profiles", profiles[0])
    row = _sync(env)
    assert (row.outcome, row.summary_counts["deleted"]) == ("succeeded", 1)
    assert _active(engine, "autopilot_profiles") == set()


def test_a_listing_that_ended_early_deletes_only_what_a_second_listing_confirms(env):
    engine, tenant, sim = env["engine"], env["tenant"], env["sim"]
    _grow(tenant, "settings_catalog", 150)  # two pages of 100
    _sync(env)
    # One page arrives without its nextLink: the listing stops at 100 of 150, without an error.
    sim.faults.once("configurationPolicies?", "no_next_link")
    row = _sync(env)
    assert sim.faults.pending_one_shots == 0
    assert row.summary_counts["deleted"] == 0
    assert _active(engine, "settings_catalog") == {
        o["id"] for o in tenant.policies("settings_catalog")
    }
    assert row.outcome == "partially_succeeded"
    [entry] = row.failure_summary
    assert (entry["reason_code"], entry["contract_key"]) == (
        "provider_bad_response",
        "settings_catalog",
    )
    assert "the listing ended early without an error: 50 object(s)" in entry["message"]

    # Two policies of the unlisted page are really gone: exactly those are deleted.
    gone = [o["id"] for o in tenant.policies("settings_catalog")][-2:]
    for external_id in gone:
        tenant.delete_policy("settings_catalog", external_id)
    sim.faults.once("configurationPolicies?", "no_next_link")
    row = _sync(env)
    assert row.summary_counts["deleted"] == 2
    assert row.summary_counts["deletions_unconfirmed"] == 48
    assert _active(engine, "settings_catalog") == {
        o["id"] for o in tenant.policies("settings_catalog")
    }
