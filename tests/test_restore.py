"""Restore (DESIGN §9) against the Graph simulator: a plan writes nothing and lists exactly what
changed; an execution runs once, puts every item back, touches nothing else and never
duplicates; matching never guesses; references map across tenants; conflicts, lost answers and
re-pointed connections write nothing they should not."""

from __future__ import annotations

import copy
import io
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import cli, db, schema
from atlas_dagster.config import load_config
from atlas_dagster.connections import ensure_partitions
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.ledger.store import OperationRun
from atlas_dagster.restore import rules
from atlas_dagster.restore import store as plans
from atlas_dagster.restore.plan import Selection
from atlas_dagster.simulator import (
    GraphSimulator,
    SimulatedTenant,
    install_simulator,
    portal,
    uninstall_simulator,
)
from atlas_dagster.simulator import payloads as p
from graph_contracts import CONTRACTS, all_permissions, content_hash, is_builtin, write_permissions

READ_WRITE = [*all_permissions(), *write_permissions()]

CONFIG = """\
database_url: {url}
provider_connections:
  - key: contoso
    simulated: {{profile: small, seed: 3}}
  - key: fabrikam
    simulated: {{profile: small, seed: {target_seed}}}
backup_schedules:
  - key: contoso-nightly
    provider_connection: contoso
    cron: "0 2 * * *"
    policy_types: all
    retention_days: 30
"""


@dataclass
class Env:
    config: Any
    cfg: Path
    engine: sa.Engine
    defs: dg.Definitions
    instance: dg.DagsterInstance
    sims: dict[str, GraphSimulator]
    tmp: Path

    @property
    def tenant(self) -> SimulatedTenant:
        return self.sims["contoso"].tenant

    def start(self, run_type: str, connection: str = "contoso", **kw: Any) -> OperationRun:
        return start_operation(
            self.config,
            run_type,
            defs=self.defs,
            connection=connection,
            in_process=True,
            instance=self.instance,
            **kw,
        ).row

    def backup(self) -> int:
        row = self.start("backup_schedule.run_now", schedule="contoso-nightly")
        assert row.outcome == "succeeded", row.failure_summary
        return int(row.context["backup_schedule_run_id"])

    def plan(self, set_id: int, connection: str = "contoso", **selection: Any) -> int:
        sel = Selection(**selection)
        row = self.start(
            "restore.plan",
            connection=connection,
            backup_set_id=set_id,
            target_scope=sel.scope(set_id),
        )
        assert row.outcome == "succeeded", row.failure_summary
        return int(row.context["restore_run_id"])

    def execute(self, plan_id: int, connection: str = "contoso") -> OperationRun:
        return self.start("restore.execute", connection=connection, restore_run_id=plan_id)

    def items(self, plan_id: int) -> list[plans.RestoreItem]:
        return plans.plan_items(self.engine, plan_id)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(["--config", str(self.cfg), *argv])
        return code, out.getvalue(), err.getvalue()


def writes_seen(sim: GraphSimulator) -> int:
    return sum(
        n
        for key, n in sim.stats.per_contract.items()
        if CONTRACTS.get(key, None) and CONTRACTS[key].write
    )


@pytest.fixture
def env(tmp_path, database_url, monkeypatch) -> Any:
    sims = {
        "contoso": GraphSimulator(SimulatedTenant.generate("small", 3), granted_roles=READ_WRITE),
        "fabrikam": GraphSimulator(SimulatedTenant.generate("small", 5), granted_roles=READ_WRITE),
    }
    for key, sim in sims.items():
        install_simulator(key, sim)
    cfg = tmp_path / "atlas.yaml"
    cfg.write_text(CONFIG.format(url=database_url, target_seed=5))
    monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
    config = load_config(cfg)
    engine = db.ready_engine(config)
    with dg.instance_for_test() as instance:
        ensure_partitions(instance, ["contoso", "fabrikam"])
        yield Env(config, cfg, engine, build_definitions(config), instance, sims, tmp_path)
    for key in sims:
        uninstall_simulator(key)


def _snapshot(tenant: SimulatedTenant) -> dict[tuple[str, str], str]:
    out = {}
    for key in CONTRACTS:
        contract = CONTRACTS[key]
        if not contract.policy:
            continue
        for obj in tenant.policies(key):
            out[(key, str(obj["id"]))] = content_hash(contract, obj)
    return out


def test_a_plan_lists_exactly_the_25_changes_and_an_execution_puts_them_back_once(env):
    sim, tenant = env.sims["contoso"], env.tenant
    portal.prepare(tenant)
    set_id = env.backup()
    backed_up = Counter(key for key, _ in _snapshot(tenant))
    edits = portal.edit(tenant)
    assert len(edits) == 25

    writes = writes_seen(sim)
    plan_id = env.plan(set_id)
    assert writes_seen(sim) == writes, "a plan writes nothing"
    items = env.items(plan_id)
    listed = {
        (i.contract_key, i.source_external_id): i for i in items if i.action != rules.UNCHANGED
    }
    assert set(listed) == set(edits)
    for key, what in edits.items():
        item = listed[key]
        if key[0] == "device_configurations" and what == "deleted":
            assert (item.action, item.reason_code) == ("skip", "restore_secret_unavailable")
            assert "Wlan" in (item.message or "")
        elif what == "deleted":
            assert item.action == rules.CREATE, (key, item.reason_code, item.message)
        else:
            assert item.action == rules.UPDATE, (key, item.reason_code, item.message)
            assert any(c["path"].startswith(what) for c in item.changes), (what, item.changes)
            assert item.target_external_id == key[1], "updated in place"
    held = [i for i in listed.values() if i.contract_key == "conditional_access_policies"]
    assert all("report-only" in (i.message or "") for i in held)

    untouched = {k: v for k, v in _snapshot(tenant).items() if k not in edits}
    row = env.execute(plan_id)
    assert row.outcome == "succeeded", row.failure_summary
    done = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    for key in edits:
        item = done[key]
        if item.action == rules.SKIP:
            assert item.result == "skipped"
            continue
        assert item.result in ("created", "updated") and item.verified, (
            key,
            item.result,
            item.error,
        )
        live = next(o for o in tenant.policies(key[0]) if o["id"] == item.target_external_id)
        assert rules.view(CONTRACTS[key[0]], live) == item.planned_view
    # Nothing else changed; nothing was created twice (the encrypted profile stays deleted).
    after = _snapshot(tenant)
    assert {k: after[k] for k in untouched} == untouched
    counts = Counter(key for key, _ in after)
    assert counts == backed_up - Counter({"device_configurations": 1})
    # Conditional access comes back in report-only, never enforced by a restore.
    for item in held:
        live = next(
            o
            for o in tenant.policies(item.contract_key)
            if o["id"] == done[(item.contract_key, item.source_external_id)].target_external_id
        )
        assert live["state"] == rules.CA_REPORT_ONLY
    summary = row.summary_counts
    assert summary["writes"] == sum(len(i.writes) for i in items)

    writes = writes_seen(sim)
    code, _, err = env.cli(
        "restore", "execute", "--plan", str(plan_id), "--confirm", "--in-process"
    )
    assert code == 2 and "executed" in err
    assert writes_seen(sim) == writes, "a second execution writes nothing"

    again = env.items(env.plan(set_id))
    pending = [i for i in again if i.action != rules.UNCHANGED]
    assert [(i.contract_key, i.reason_code) for i in pending] == [
        ("device_configurations", "restore_secret_unavailable")
    ]
    still_held = [i for i in again if i.message and "report-only" in i.message]
    assert sorted(i.source_external_id for i in still_held) == sorted(
        i.source_external_id for i in held
    )


# --- matching ------------------------------------------------------------------------------------


def _same_name_pair(tenant: SimulatedTenant) -> list[dict[str, Any]]:
    base = next(o for o in tenant.policies("compliance_policies"))
    pair = []
    for n in range(2):
        obj = copy.deepcopy(base)
        obj.pop("id")
        obj.update(displayName="WIN - Compliance - Same name", description=f"copy {n}")
        pair.append(tenant.add_policy("compliance_policies", obj))
    return pair


def test_two_policies_of_one_name_are_each_restored_to_their_own_content(env):
    tenant = env.tenant
    pair = _same_name_pair(tenant)
    set_id = env.backup()
    # Each edited, one the other's way round: matched by id, never by the shared name.
    tenant.update_policy("compliance_policies", pair[0]["id"], {"description": "copy 1"})
    tenant.update_policy("compliance_policies", pair[1]["id"], {"description": "copy 0"})
    plan_id = env.plan(set_id, types=("compliance_policies",))
    updates = {i.source_external_id: i for i in env.items(plan_id) if i.action == rules.UPDATE}
    assert set(updates) == {pair[0]["id"], pair[1]["id"]}
    assert all(i.target_external_id == i.source_external_id for i in updates.values())
    assert env.execute(plan_id).outcome == "succeeded"
    live = {o["id"]: o for o in tenant.policies("compliance_policies")}
    assert [live[o["id"]]["description"] for o in pair] == ["copy 0", "copy 1"]
    assert sum(o["displayName"] == pair[0]["displayName"] for o in live.values()) == 2


def test_a_deleted_twin_is_created_again_and_the_other_is_left_alone(env):
    tenant = env.tenant
    pair = _same_name_pair(tenant)
    set_id = env.backup()
    tenant.delete_policy("compliance_policies", pair[1]["id"])
    plan_id = env.plan(set_id, types=("compliance_policies",))
    listed = {i.source_external_id: i for i in env.items(plan_id)}
    # The survivor is matched by id, so the deleted one has no candidate left: a create.
    assert listed[pair[0]["id"]].action == rules.UNCHANGED
    assert listed[pair[1]["id"]].action == rules.CREATE
    assert env.execute(plan_id).outcome == "succeeded"
    named = [
        o
        for o in tenant.policies("compliance_policies")
        if o["displayName"] == pair[0]["displayName"]
    ]
    assert sorted(o["description"] for o in named) == ["copy 0", "copy 1"]


def test_matching_by_name_never_guesses():
    contract = CONTRACTS["compliance_policies"]
    item = {"id": "a", "displayName": "Same", "@odata.type": "#microsoft.graph.iosCompliancePolicy"}
    twins = [{**item, "id": "t1"}, {**item, "id": "t2"}]
    [match] = rules.match_items(contract, [item], twins, same_tenant=False)
    assert match.target is None and "2 target objects" in (match.blocked or "")
    # Two items wanting the one candidate: neither gets it.
    other = {**item, "id": "b"}
    matches = rules.match_items(contract, [item, other], twins[:1], same_tenant=False)
    assert all(m.target is None and m.blocked for m in matches)
    # A target another item matched by id is not a name candidate.
    matches = rules.match_items(contract, [item, {**item, "id": "t1"}], twins[:1], same_tenant=True)
    assert matches[0] == rules.Match(None) and matches[1].target == twins[0]


# --- across tenants ------------------------------------------------------------------------------


def test_a_set_restored_into_another_tenant_maps_groups_by_name_or_blocks(env):
    source, target = env.tenant, env.sims["fabrikam"].tenant
    names_there = {g["displayName"] for g in target.groups()}
    mapped, unmapped = source.policies("compliance_policies")[:2]
    groups = [g for g in source.groups() if g["displayName"] not in names_there][:2]
    for obj, group in zip((mapped, unmapped), groups, strict=True):
        target_ = {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": group["id"]}
        assignment = p.make_assignment("compliance_policies", obj["id"], target_)
        source.set_assignments("compliance_policies", obj["id"], [assignment])
    # The first group's name exists in the target once; the second's not at all.
    twin = target.add_group(groups[0]["displayName"])
    assert env.start("directory_groups.sync").outcome == "succeeded"  # names for the backup
    set_id = env.backup()

    plan_id = env.plan(set_id, connection="fabrikam", items=(mapped["id"], unmapped["id"]))
    items = {i.source_external_id: i for i in env.items(plan_id)}
    assert items[mapped["id"]].action == rules.CREATE, items[mapped["id"]].message
    assert (items[unmapped["id"]].action, items[unmapped["id"]].reason_code) == (
        rules.BLOCKED,
        "restore_group_unmapped",
    )
    before = Counter(o["displayName"] for o in target.policies("compliance_policies"))
    row = env.execute(plan_id, connection="fabrikam")
    assert row.outcome == "partially_succeeded"
    assert [f["reason_code"] for f in row.failure_summary] == ["restore_group_unmapped"]
    created = [
        o
        for o in target.policies("compliance_policies")
        if o["displayName"] == mapped["displayName"]
    ]
    assert len(created) == before[mapped["displayName"]] + 1
    groups = {a["target"].get("groupId") for a in created[-1]["assignments"]} - {None}
    assert groups == {twin["id"]}
    assert not any(
        o["displayName"] == unmapped["displayName"]
        for o in target.policies("compliance_policies")
        if o["displayName"] not in before
    )
    assert env.sims["contoso"].stats.per_contract["compliance_policies.create"] == 0


def test_users_and_named_locations_map_into_another_tenant_by_name_or_block_the_policy(env):
    source, target = env.tenant, env.sims["fabrikam"].tenant
    location = {"@odata.type": "#microsoft.graph.ipNamedLocation", "isTrusted": True}
    hq, lab = (
        source.add_policy("named_locations", {**location, "displayName": n}) for n in ("HQ", "Lab")
    )
    target_hq = target.add_policy("named_locations", {**location, "displayName": "HQ"})
    user = {"@odata.type": "#microsoft.graph.user"}
    glass, ops = (
        source.add_policy("users", {**user, "displayName": n}) for n in ("Break Glass", "Ops Admin")
    )
    target_glass = target.add_policy("users", {**user, "displayName": "Break Glass"})
    for _ in range(2):
        target.add_policy("users", {**user, "displayName": "Ops Admin"})
    base = source.policies("conditional_access_policies")[0]
    policies = []
    for name, excluded_user, excluded_location in (
        ("CA - outside HQ", glass, hq),
        ("CA - in the lab", None, lab),
        ("CA - ops", ops, None),
    ):
        obj = copy.deepcopy(base)
        obj.pop("id")
        obj["displayName"] = name
        obj["conditions"]["users"].update(
            includeUsers=["All"],
            excludeUsers=[excluded_user["id"]] if excluded_user else [],
            includeGroups=[],
            excludeGroups=[],
        )
        obj["conditions"]["locations"] = {
            "includeLocations": ["All"],
            "excludeLocations": [
                "AllTrusted",
                *([excluded_location["id"]] if excluded_location else []),
            ],
        }
        policies.append(source.add_policy("conditional_access_policies", obj))
    set_id = env.backup()
    chosen = tuple(o["id"] for o in policies)

    plan_id = env.plan(set_id, connection="fabrikam", items=chosen)
    mapped, no_lab, two_ops = (
        {i.source_external_id: i for i in env.items(plan_id)}[o["id"]] for o in policies
    )
    assert mapped.action == rules.CREATE, mapped.message
    conditions = mapped.planned_view["conditions"]
    assert conditions["users"]["excludeUsers"] == [target_glass["id"]]
    assert conditions["locations"]["excludeLocations"] == ["AllTrusted", target_hq["id"]]
    for item, why in ((no_lab, "'Lab'"), (two_ops, "2 users in the target are named 'Ops Admin'")):
        assert (item.action, item.reason_code) == (rules.BLOCKED, "restore_reference_unmapped")
        assert why in (item.message or ""), item.message
    row = env.execute(plan_id, connection="fabrikam")
    assert [f["reason_code"] for f in row.failure_summary] == ["restore_reference_unmapped"] * 2
    created = {o["displayName"]: o for o in target.policies("conditional_access_policies")}
    assert created["CA - outside HQ"]["conditions"]["users"] == {
        **base["conditions"]["users"],
        **conditions["users"],
    }
    assert created["CA - outside HQ"]["conditions"]["locations"] == conditions["locations"]
    assert "CA - in the lab" not in created and "CA - ops" not in created

    # Into its own tenant ids stay as they are; a location that is gone blocks its policy.
    source.delete_policy("named_locations", lab["id"])
    for obj in policies:
        source.delete_policy("conditional_access_policies", obj["id"])
    plan_id = env.plan(set_id, items=chosen)
    mapped, no_lab, ops_item = (
        {i.source_external_id: i for i in env.items(plan_id)}[o["id"]] for o in policies
    )
    assert mapped.action == ops_item.action == rules.CREATE
    assert mapped.planned_view["conditions"]["locations"]["excludeLocations"][1] == hq["id"]
    assert ops_item.planned_view["conditions"]["users"]["excludeUsers"] == [ops["id"]]
    assert (no_lab.action, no_lab.reason_code) == (rules.BLOCKED, "restore_reference_unmapped")


# --- safety --------------------------------------------------------------------------------------


def test_a_target_edited_between_plan_and_execute_ends_in_conflict_and_is_not_written(env):
    tenant = env.tenant
    set_id = env.backup()
    first, second = tenant.policies("compliance_policies")[:2]
    for obj in (first, second):
        tenant.update_policy("compliance_policies", obj["id"], {"description": "portal"})
    plan_id = env.plan(set_id, types=("compliance_policies",))
    tenant.update_policy("compliance_policies", first["id"], {"description": "edited again"})
    row = env.execute(plan_id)
    assert row.outcome == "partially_succeeded"
    assert [f["reason_code"] for f in row.failure_summary] == ["restore_conflict"]
    results = {i.source_external_id: i.result for i in env.items(plan_id)}
    assert results[first["id"]] == "conflict" and results[second["id"]] == "updated"
    live = {o["id"]: o for o in tenant.policies("compliance_policies")}
    assert live[first["id"]]["description"] == "edited again"
    assert live[second["id"]]["description"] == second["description"]


@pytest.mark.parametrize("fault", ["drop_response", "timeout"])
def test_a_create_whose_answer_is_lost_is_never_sent_twice(env, monkeypatch, fault):
    from atlas_dagster.restore import execute

    monkeypatch.setattr(execute, "LOOKUP_WAITS", (0.0, 0.01))
    sim, tenant = env.sims["contoso"], env.tenant
    set_id = env.backup()
    gone = tenant.policies("compliance_policies")[0]
    tenant.delete_policy("compliance_policies", gone["id"])
    plan_id = env.plan(set_id, types=("compliance_policies",))
    count = len(tenant.policies("compliance_policies"))
    # drop_response: the create happens and its answer is lost; timeout: it never arrives.
    sim.faults.once("deviceCompliancePolicies", fault, writes_only=True)
    row = env.execute(plan_id)
    assert sim.stats.per_contract["compliance_policies.create"] == 1, "never re-sent"
    [item] = [i for i in env.items(plan_id) if i.action == rules.CREATE]
    if fault == "drop_response":
        assert row.outcome == "succeeded"
        assert (item.result, item.verified) == ("created", True)
        assert len(tenant.policies("compliance_policies")) == count + 1
        assert item.target_external_id in {o["id"] for o in tenant.policies("compliance_policies")}
    else:
        assert row.outcome == "partially_succeeded"
        assert item.result == "outcome_unknown"
        assert [f["reason_code"] for f in row.failure_summary] == ["restore_outcome_unknown"]
        assert len(tenant.policies("compliance_policies")) == count


def test_a_connection_re_pointed_at_another_tenant_refuses_the_plan(env, monkeypatch):
    set_id = env.backup()
    env.tenant.delete_policy(
        "compliance_policies", env.tenant.policies("compliance_policies")[0]["id"]
    )
    plan_id = env.plan(set_id, types=("compliance_policies",))
    elsewhere = GraphSimulator(SimulatedTenant.generate("small", 4), granted_roles=READ_WRITE)
    install_simulator("contoso", elsewhere)
    env.cfg.write_text(env.cfg.read_text().replace("seed: 3", "seed: 4"))
    code, _, err = env.cli(
        "restore", "execute", "--plan", str(plan_id), "--confirm", "--in-process"
    )
    assert code == 2 and "now points at tenant" in err
    assert writes_seen(elsewhere) == writes_seen(env.sims["contoso"]) == 0
    assert plans.get_plan(env.engine, plan_id).status == "planned"


def test_a_read_only_app_plans_blocked_items_and_executes_no_write(env):
    sim, tenant = env.sims["contoso"], env.tenant
    sim.granted_roles = all_permissions()
    set_id = env.backup()
    ca = next(o for o in tenant.policies("conditional_access_policies"))
    tenant.delete_policy("conditional_access_policies", ca["id"])
    policy = tenant.policies("compliance_policies")[0]
    tenant.update_policy("compliance_policies", policy["id"], {"description": "portal"})
    plan_id = env.plan(set_id, types=("compliance_policies", "conditional_access_policies"))
    blocked = {i.contract_key: i for i in env.items(plan_id) if i.action == rules.BLOCKED}
    assert set(blocked) == {"compliance_policies", "conditional_access_policies"}
    assert all(i.reason_code == "provider_permission_denied" for i in blocked.values())
    assert "DeviceManagementConfiguration.ReadWrite.All" in blocked["compliance_policies"].message
    # Creating a CA policy takes three permissions: the two the reads lack are named.
    assert "Policy.ReadWrite.ConditionalAccess" in blocked["conditional_access_policies"].message
    assert "Application.Read.All" in blocked["conditional_access_policies"].message
    row = env.execute(plan_id)
    assert row.outcome == "partially_succeeded"
    assert writes_seen(sim) == 0


def test_execute_refuses_without_confirm_expired_or_of_another_connection(env):
    sim = env.sims["contoso"]
    set_id = env.backup()
    env.tenant.delete_policy(
        "compliance_policies", env.tenant.policies("compliance_policies")[0]["id"]
    )
    plan_id = env.plan(set_id, types=("compliance_policies",))
    code, _, err = env.cli("restore", "execute", "--plan", str(plan_id), "--in-process")
    assert code == 2 and "--confirm" in err
    code, _, err = env.cli(
        "restore", "execute", "--plan", str(plan_id), "--confirm", "--connection", "fabrikam"
    )
    assert code == 2 and "restores into 'contoso'" in err
    code, _, err = env.cli("restore", "execute", "--plan", "999", "--confirm")
    assert code == 2 and "no restore plan #999" in err
    code, _, err = env.cli(
        "restore", "plan", "--set", str(set_id), "--items", "nope", "--in-process"
    )
    assert code == 2 and "holds no object nope" in err
    code, _, err = env.cli(
        "restore", "plan", "--set", str(set_id), "--types", "nope", "--in-process"
    )
    assert code == 2 and "unknown policy type nope" in err
    with env.engine.begin() as conn:
        conn.execute(
            schema.restore_plans.update()
            .where(schema.restore_plans.c.id == plan_id)
            .values(expires_at=schema.utcnow() - timedelta(seconds=1))
        )
    code, _, err = env.cli(
        "restore", "execute", "--plan", str(plan_id), "--confirm", "--in-process"
    )
    assert code == 2 and "expired" in err
    assert writes_seen(sim) == 0
    assert not [r for r in _runs(env) if r["type"] == "restore.execute"]


def _runs(env: Env) -> list[dict[str, Any]]:
    code, out, _ = env.cli("runs", "--json")
    assert code == 0
    return json.loads(out)["operation_runs"]


def test_a_plan_is_taken_once_by_concurrent_executions(env):
    set_id = env.backup()
    plan_id = env.plan(set_id, types=("device_categories",))
    now = schema.utcnow()
    # Any ledger rows serve as the racing executions' rows (the plan references one).
    with env.engine.connect() as conn:
        run_ids = list(conn.execute(sa.select(schema.operation_runs.c.id)).scalars())
    assert len(run_ids) >= 2
    barrier = threading.Barrier(len(run_ids))

    def take(run_id: int) -> bool:
        barrier.wait()
        return plans.take(env.engine, plan_id, run_id, now)

    with ThreadPoolExecutor(max_workers=len(run_ids)) as pool:
        taken = list(pool.map(take, run_ids))
    [winner] = [run_id for run_id, won in zip(run_ids, taken, strict=True) if won]
    assert plans.get_plan(env.engine, plan_id).execute_operation_run_id == winner
    assert plans.take(env.engine, plan_id, run_ids[0], now) is False


def test_runs_of_the_execute_job_without_their_plan_write_nothing(env):
    sim, tenant = env.sims["contoso"], env.tenant
    set_id = env.backup()
    tenant.delete_policy("compliance_policies", tenant.policies("compliance_policies")[0]["id"])
    plan_id = env.plan(set_id, types=("compliance_policies",))
    job = env.defs.resolve_job_def("restore_execute_job")
    # Launched from the UI: no row, no plan.
    result = job.execute_in_process(
        instance=env.instance, partition_key="contoso", raise_on_error=False
    )
    assert not result.success
    assert writes_seen(sim) == 0
    row = env.execute(plan_id)
    assert row.outcome == "succeeded" and writes_seen(sim) > 0
    written = writes_seen(sim)
    # A re-execution or retry copies the original run's tags: it finds the plan taken.
    tags = env.instance.get_run_by_id(row.dagster_run_id).tags
    again = job.execute_in_process(
        instance=env.instance,
        partition_key="contoso",
        tags={k: v for k, v in tags.items() if k.startswith("atlas/")},
        raise_on_error=False,
    )
    assert not again.success
    assert writes_seen(sim) == written


def test_plan_show_and_execute_speak_json(env):
    set_id = env.backup()
    env.tenant.delete_policy(
        "compliance_policies", env.tenant.policies("compliance_policies")[0]["id"]
    )
    code, out, _ = env.cli(
        "restore",
        "plan",
        "--set",
        str(set_id),
        "--types",
        "compliance_policies",
        "--in-process",
        "--json",
    )
    assert code == 0
    answer = json.loads(out)
    assert answer["created"] and answer["operation_run"]["type"] == "restore.plan"
    plan = answer["restore_plan"]
    assert plan["status"] == "planned" and plan["summary_counts"]["create"] == 1
    assert [i["action"] for i in plan["items"]].count("create") == 1
    code, out, _ = env.cli("restore", "show", str(plan["id"]), "--json")
    assert code == 0 and json.loads(out)["restore_plan"]["id"] == plan["id"]
    code, out, _ = env.cli(
        "restore", "execute", "--plan", str(plan["id"]), "--confirm", "--in-process", "--json"
    )
    assert code == 0
    done = json.loads(out)
    assert done["operation_run"]["type"] == "restore.execute"
    assert done["restore_plan"]["status"] == "executed"
    assert [i["result"] for i in done["restore_plan"]["items"]].count("created") == 1
    # The cache is made true again by an inventory sync of its own.
    assert [r["type"] for r in _runs(env)][0] == "inventory.sync"
    code, out, _ = env.cli("restore", "show", str(plan["id"]))
    assert code == 0 and "executed" in out and "created" in out


def test_an_object_of_the_name_created_since_the_plan_is_not_duplicated(env):
    tenant = env.tenant
    set_id = env.backup()
    gone = tenant.policies("compliance_policies")[0]
    tenant.delete_policy("compliance_policies", gone["id"])
    plan_id = env.plan(set_id, types=("compliance_policies",))
    # An admin recreates it by hand before the plan is executed.
    again = {k: v for k, v in gone.items() if k != "id"}
    tenant.add_policy("compliance_policies", again)
    count = len(tenant.policies("compliance_policies"))
    row = env.execute(plan_id)
    assert row.outcome == "partially_succeeded"
    assert [f["reason_code"] for f in row.failure_summary] == ["restore_conflict"]
    assert env.sims["contoso"].stats.per_contract["compliance_policies.create"] == 0
    assert len(tenant.policies("compliance_policies")) == count


def test_intents_of_a_deprecated_template_are_skipped_and_each_template_is_read_once(env):
    sim, tenant = env.sims["contoso"], env.tenant
    deprecated = next(t for t, v in p.TEMPLATES.items() if v.get("isDeprecated"))
    base = tenant.policies("endpoint_security_intents")[0]
    made = []
    for n in range(3):
        obj = copy.deepcopy(base)
        obj.pop("id")
        obj.update(displayName=f"Old baseline {n}", templateId=deprecated)
        made.append(tenant.add_policy("endpoint_security_intents", obj))
    set_id = env.backup()
    for obj in made:
        tenant.delete_policy("endpoint_security_intents", obj["id"])
    before = sim.stats.per_contract["endpoint_security_templates.item"]
    plan_id = env.plan(set_id, items=tuple(o["id"] for o in made))
    for item in env.items(plan_id):
        assert (item.action, item.reason_code) == (rules.SKIP, "restore_unsupported")
        assert "deprecated" in (item.message or "")
    assert sim.stats.per_contract["endpoint_security_templates.item"] - before == 1


def test_every_writable_type_comes_back_from_a_deletion_and_a_rename(env):
    tenant = env.tenant
    set_id = env.backup()
    changed: dict[tuple[str, str], str] = {}
    for key in CONTRACTS:
        contract = CONTRACTS[key]
        if not contract.policy or contract.writes is None:
            continue
        mine = [o for o in tenant.stored_policies(key) if not is_builtin(contract, o)]
        if len(mine) < 2:
            continue
        tenant.delete_policy(key, mine[0]["id"])
        changed[(key, mine[0]["id"])] = "deleted"
        name = mine[1].get(contract.name_field) or ""
        tenant.update_policy(key, mine[1]["id"], {contract.name_field: name + " (renamed)"})
        changed[(key, mine[1]["id"])] = "renamed"
    plan_id = env.plan(set_id)
    items = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    for key, what in changed.items():
        item = items[key]
        if item.action == rules.SKIP:
            assert item.reason_code and item.message, key  # a stated reason, never silence
            continue
        assert item.action == (rules.CREATE if what == "deleted" else rules.UPDATE), (
            key,
            item.action,
            item.reason_code,
            item.message,
        )
    row = env.execute(plan_id)
    done = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    wrong = {
        key: (done[key].result, done[key].verified, done[key].error)
        for key in changed
        if done[key].action != rules.SKIP
        and (done[key].result not in ("created", "updated") or not done[key].verified)
    }
    assert wrong == {}, row.failure_summary
    # In this tenant every type can take its objects back: nothing was skipped.
    assert [k for k in changed if done[k].action == rules.SKIP] == []
    assert len(changed) == 54  # two objects of each of the 27 writable types


def test_every_assignable_type_gets_its_assignments_back(env):
    tenant = env.tenant
    set_id = env.backup()
    cleared = []
    for key in CONTRACTS:
        contract = CONTRACTS[key]
        if not contract.policy or contract.writes is None or contract.writes.assign is None:
            continue
        assigned = [
            o
            for o in tenant.stored_policies(key)
            if o.get("assignments") and not is_builtin(contract, o)
        ]
        if assigned:
            tenant.update_policy(key, assigned[0]["id"], {"assignments": []})
            cleared.append((key, assigned[0]["id"]))
    plan_id = env.plan(set_id)
    planned = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    assert {k for k, i in planned.items() if i.action != rules.UNCHANGED} == set(cleared)
    assert env.execute(plan_id).outcome == "succeeded"
    done = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    assert {k: (done[k].result, done[k].verified) for k in cleared} == {
        k: ("updated", True) for k in cleared
    }
    assert len(cleared) >= 20


def test_every_kind_of_nested_content_is_written_back_as_graph_takes_it(env):
    tenant = env.tenant
    set_id = env.backup()
    edited = {}
    for key in CONTRACTS:
        contract = CONTRACTS[key]
        if not contract.policy or contract.writes is None:
            continue
        sources = {w.source for w in contract.writes.nested if w.source and w.effect != "field"}
        for source in sorted(sources - {"assignments"}):
            candidates = [
                o
                for o in tenant.stored_policies(key)
                if len(o.get(source) or ()) >= 2
                and not is_builtin(contract, o)
                and (key, o["id"]) not in edited
            ]
            if candidates:
                obj = candidates[0]
                tenant.update_policy(key, obj["id"], {source: obj[source][:-1]})
                edited[(key, obj["id"])] = source
    # A compliance policy keeps its one block rule: its grace period changes instead.
    policy = next(
        o
        for o in tenant.stored_policies("compliance_policies")
        if ("compliance_policies", o["id"]) not in edited
    )
    actions = copy.deepcopy(policy["scheduledActionsForRule"])
    actions[0]["scheduledActionConfigurations"][0]["gracePeriodHours"] = 72
    tenant.update_policy("compliance_policies", policy["id"], {"scheduledActionsForRule": actions})
    edited[("compliance_policies", policy["id"])] = "scheduledActionsForRule"
    plan_id = env.plan(set_id)
    planned = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    for key, source in edited.items():
        item = planned[key]
        assert item.action == rules.UPDATE, (key, item.reason_code, item.message)
        assert any(c["path"].startswith(source) for c in item.changes), (key, item.changes)
    assert env.execute(plan_id).outcome == "succeeded"
    done = {(i.contract_key, i.source_external_id): i for i in env.items(plan_id)}
    assert {k: (done[k].result, done[k].verified) for k in edited} == {
        k: ("updated", True) for k in edited
    }
    # Settings, definition values, scheduled actions, apps, role assignments, localized
    # messages, policy set items: each written by its own kind of write.
    assert set(edited.values()) >= {
        "settings",
        "definitionValues",
        "scheduledActionsForRule",
        "apps",
        "localizedNotificationMessages",
    }


def test_a_plan_whose_execution_died_says_so_and_never_runs_again(env, monkeypatch):
    from atlas_dagster.restore import execute

    set_id = env.backup()
    env.tenant.delete_policy(
        "compliance_policies", env.tenant.policies("compliance_policies")[0]["id"]
    )
    plan_id = env.plan(set_id, types=("compliance_policies",))

    def dies(self, items):
        raise RuntimeError("the worker died mid-execution")

    monkeypatch.setattr(execute.Executor, "run", dies)
    row = env.execute(plan_id)
    assert row.outcome == "failed"
    code, out, _ = env.cli("restore", "show", str(plan_id), "--json")
    shown = json.loads(out)["restore_plan"]
    assert (shown["status"], shown["interrupted"], shown["execution_outcome"]) == (
        "executing",
        True,
        "failed",
    )
    monkeypatch.undo()
    code, _, err = env.cli(
        "restore", "execute", "--plan", str(plan_id), "--confirm", "--in-process"
    )
    assert code == 2 and "make a new plan" in err
    assert writes_seen(env.sims["contoso"]) == 0


def test_writes_throttled_by_intune_are_retried_after_their_retry_after(env):
    from atlas_dagster.simulator.writes import WriteLimits

    sim, tenant = env.sims["contoso"], env.tenant
    set_id = env.backup()
    for obj in tenant.policies("compliance_policies")[:4]:
        tenant.update_policy("compliance_policies", obj["id"], {"description": "portal"})
    plan_id = env.plan(set_id, types=("compliance_policies",))
    # Two writes a second for this app: the execution's four updates meet 429s.
    sim.write_limits = WriteLimits(per_app=2, per_tenant=200, window_s=1.0)
    row = env.execute(plan_id)
    assert row.outcome == "succeeded", row.failure_summary
    assert row.summary_counts["graph_throttled_retries"] > 0
    assert row.summary_counts["writes"] == 4
    done = [i for i in env.items(plan_id) if i.action == rules.UPDATE]
    assert [(i.result, i.verified) for i in done] == [("updated", True)] * 4
