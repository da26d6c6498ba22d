"""Restore (DESIGN §9) against the Graph simulator: a plan writes nothing and lists exactly what
changed; an execution runs once, puts every item back, touches nothing else and never
duplicates; matching never guesses; references map across tenants; conflicts, lost answers and
re-pointed connections write nothing they should not."""

from __future__ import annotations

import copy
import io
import json
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import cli, db
from atlas_dagster.config import load_config
from atlas_dagster.connections import ensure_partitions
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.ledger.store import OperationRun
from atlas_dagster.restore import rules
from atlas_dagster.restore import store as plans
from atlas_dagster.restore.engine import Selection
from atlas_dagster.simulator import (
    GraphSimulator,
    SimulatedTenant,
    install_simulator,
    uninstall_simulator,
)
from atlas_dagster.simulator import payloads as p
from graph_contracts import CONTRACTS, all_permissions, content_hash, write_permissions

READ_WRITE = [*all_permissions(), *write_permissions()]
ENCRYPTED_PROFILE = "WIN - Custom - Encrypted Wi-Fi key"

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


def _encrypted_profile() -> dict[str, Any]:
    # A custom profile whose OMA value Graph returns masked (isEncrypted).
    return {
        "@odata.type": "#microsoft.graph.windows10CustomConfiguration",
        "displayName": ENCRYPTED_PROFILE,
        "description": "",
        "roleScopeTagIds": ["0"],
        "omaSettings": [
            {
                "@odata.type": "#microsoft.graph.omaSettingString",
                "displayName": "Wi-Fi key",
                "omaUri": "./Vendor/MSFT/WiFi/Profile/Corp/WlanXml",
                "isEncrypted": True,
                "secretReferenceValueId": "5b0e2f4a-1111-4c3b-9d7e-000000000001",
                "value": "****",
            },
            {
                "@odata.type": "#microsoft.graph.omaSettingString",
                "displayName": "Plain",
                "omaUri": "./Device/Vendor/MSFT/Policy/Config/Custom/Plain",
                "isEncrypted": False,
                "value": "1",
            },
        ],
        "assignments": [],
    }


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


def _stored(tenant: SimulatedTenant, key: str) -> list[dict[str, Any]]:
    return [
        o
        for o in tenant.stored_policies(key)
        if not o.get("isBuiltIn") and not o.get("isGlobalScript")
    ]


def _snapshot(tenant: SimulatedTenant) -> dict[tuple[str, str], str]:
    out = {}
    for key in CONTRACTS:
        contract = CONTRACTS[key]
        if not contract.policy:
            continue
        for obj in tenant.policies(key):
            out[(key, str(obj["id"]))] = content_hash(contract, obj)
    return out


def _portal_edits(tenant: SimulatedTenant) -> dict[tuple[str, str], str]:
    """25 changes an admin makes in the portal after the backup: what each did, by the
    backed-up object it changed."""
    done: dict[tuple[str, str], str] = {}

    def pick(key: str, n: int, test=lambda o: True) -> dict[str, Any]:
        candidates = [o for o in _stored(tenant, key) if (key, o["id"]) not in done and test(o)]
        return copy.deepcopy(candidates[n])

    def edit(key: str, obj: dict[str, Any], what: str, **changes: Any) -> None:
        tenant.update_policy(key, obj["id"], changes)
        done[(key, obj["id"])] = what

    # Ten deletions of mixed types.
    deprecated = {t for t, v in p.TEMPLATES.items() if v.get("isDeprecated")}
    for key, test in (
        ("settings_catalog", lambda o: True),
        ("group_policy_configurations", lambda o: True),
        ("compliance_policies", lambda o: True),
        ("conditional_access_policies", lambda o: o.get("state") == "enabled"),
        ("powershell_scripts", lambda o: True),
        ("app_protection_ios", lambda o: True),
        ("endpoint_security_intents", lambda o: o.get("templateId") not in deprecated),
        ("device_configurations", lambda o: o.get("displayName") == ENCRYPTED_PROFILE),
        ("notification_templates", lambda o: True),
        ("mobile_app_configurations", lambda o: True),
    ):
        obj = pick(key, 0, test)
        tenant.delete_policy(key, obj["id"])
        done[(key, obj["id"])] = "deleted"
    # Ten edits.
    obj = pick("device_configurations", 0, lambda o: "omaSettings" not in o)
    edit("device_configurations", obj, "displayName", displayName=obj["displayName"] + " (old)")
    obj = pick("settings_catalog", 0, lambda o: len(o["settings"]) >= 2)
    settings = copy.deepcopy(obj["settings"])
    instance = settings[0]["settingInstance"]
    instance["choiceSettingValue" if "choiceSettingValue" in instance else "simpleSettingValue"] = {
        "@odata.type": "#microsoft.graph.deviceManagementConfigurationStringSettingValue",
        "value": "changed in the portal",
    }
    edit("settings_catalog", obj, "settings", settings=settings)
    obj = pick("settings_catalog", 0, lambda o: len(o["settings"]) >= 2)
    edit("settings_catalog", obj, "settings", settings=obj["settings"][1:])
    obj = pick("group_policy_configurations", 0, lambda o: len(o["definitionValues"]) >= 1)
    values = copy.deepcopy(obj["definitionValues"])
    values[0]["enabled"] = not values[0]["enabled"]
    edit("group_policy_configurations", obj, "definitionValues", definitionValues=values)
    obj = pick("conditional_access_policies", 0, lambda o: o.get("state") == "enabled")
    edit("conditional_access_policies", obj, "state", state="disabled")
    obj = pick("powershell_scripts", 0)
    edit("powershell_scripts", obj, "scriptContent", scriptContent="V3JpdGUtSG9zdCAiZWRpdGVkIg==")
    obj = pick("compliance_policies", 0)
    edit("compliance_policies", obj, "description", description="edited in the portal")
    obj = pick("app_protection_android", 0)
    edit("app_protection_android", obj, "pinRequired", pinRequired=not obj.get("pinRequired"))
    # An intent of a deprecated template can still be edited (and so restored in place).
    obj = pick("endpoint_security_intents", 0)
    settings = copy.deepcopy(obj["settings"])
    settings[0]["value"] = not settings[0]["value"]
    settings[0]["valueJson"] = json.dumps(settings[0]["value"])
    edit("endpoint_security_intents", obj, "settings", settings=settings)
    obj = pick("assignment_filters", 0)
    edit("assignment_filters", obj, "rule", rule='(device.osVersion -startsWith "11")')
    # Five assignment changes.
    groups = [g["id"] for g in list(tenant.groups())[:40]]

    def assignments(key: str, n: int, test) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        obj = pick(key, n, test)
        return obj, copy.deepcopy(obj["assignments"])

    obj, current = assignments("compliance_policies", 0, lambda o: len(o["assignments"]) >= 2)
    edit("compliance_policies", obj, "assignments", assignments=current[1:])
    obj, current = assignments("device_configurations", 0, lambda o: "omaSettings" not in o)
    used = {(a["target"].get("groupId")) for a in current}
    new_group = next(g for g in groups if g not in used)
    target = {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": new_group}
    current.append(p.make_assignment("device_configurations", obj["id"], target))
    edit("device_configurations", obj, "assignments", assignments=current)
    has_group = lambda o: any(a["target"].get("groupId") for a in o["assignments"])  # noqa: E731
    obj, current = assignments("app_protection_windows", 0, has_group)
    moved = next(a for a in current if a["target"].get("groupId"))
    used = {a["target"].get("groupId") for a in current}
    moved["target"]["groupId"] = next(g for g in groups if g not in used)
    edit("app_protection_windows", obj, "assignments", assignments=current)
    obj, current = assignments("app_protection_mdm_wip", 0, lambda o: len(o["assignments"]) >= 1)
    edit("app_protection_mdm_wip", obj, "assignments", assignments=[])
    obj, current = assignments(
        "device_health_scripts", 0, lambda o: any("runSchedule" in a for a in o["assignments"])
    )
    current[0]["runSchedule"] = {
        "@odata.type": "#microsoft.graph.deviceHealthScriptDailySchedule",
        "interval": 2,
        "time": "11:00:00.0000000",
        "useUtc": True,
    }
    edit("device_health_scripts", obj, "assignments", assignments=current)
    return done


def _before_backup(tenant: SimulatedTenant) -> None:
    tenant.add_policy("device_configurations", _encrypted_profile())
    script = _stored(tenant, "device_health_scripts")[0]
    current = copy.deepcopy(script["assignments"]) or [
        p.make_assignment(
            "device_health_scripts",
            script["id"],
            {
                "@odata.type": "#microsoft.graph.groupAssignmentTarget",
                "groupId": next(tenant.groups())["id"],
            },
        )
    ]
    current[0]["runSchedule"] = {
        "@odata.type": "#microsoft.graph.deviceHealthScriptDailySchedule",
        "interval": 1,
        "time": "09:00:00.0000000",
        "useUtc": False,
    }
    tenant.set_assignments("device_health_scripts", script["id"], current)


def test_a_plan_lists_exactly_the_25_changes_and_an_execution_puts_them_back_once(env):
    sim, tenant = env.sims["contoso"], env.tenant
    _before_backup(tenant)
    set_id = env.backup()
    backed_up = Counter(key for key, _ in _snapshot(tenant))
    edits = _portal_edits(tenant)
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
