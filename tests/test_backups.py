"""Backups: the store (payloads once per content hash, diff, export, retention), the backup job
against the Graph simulator, partial sets and retries."""

import hashlib
import io
import json
import random
from contextlib import ExitStack, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import cli, schema
from atlas_dagster.assets.backups import plan_backup, set_status
from atlas_dagster.config import load_config
from atlas_dagster.connections import ensure_partitions
from atlas_dagster.db import ready_engine
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.mirror import mirror_run_id
from atlas_dagster.ledger.start import StartError, start_operation
from atlas_dagster.ledger.store import OperationLedger, OperationRun, related_links
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.simulator import (
    GraphSimulator,
    SimulatedTenant,
    install_simulator,
    uninstall_simulator,
)
from atlas_dagster.stores import backups as store
from atlas_dagster.stores.backup_diff import FieldChange, diff_sets, field_diff
from atlas_dagster.stores.backup_export import MANIFEST, export_set, export_text, file_stem
from atlas_dagster.stores.checks import latest_checks
from graph_contracts import APPS, CONTRACTS, POLICY_CONTRACTS, all_permissions
from tests.conftest import write_config

# --- Field diff (pure) ---------------------------------------------------------------------


def test_reordered_unordered_arrays_are_no_change():
    before = {"settings": [{"definitionId": "a", "value": 1}, {"definitionId": "b", "value": 2}]}
    after = {"settings": [{"definitionId": "b", "value": 2}, {"definitionId": "a", "value": 1}]}
    assert field_diff(before, after) == []


def test_unordered_elements_are_matched_by_identity_and_diffed_by_field():
    before = {"settings": [{"definitionId": "a", "value": 1}, {"definitionId": "b", "value": 2}]}
    after = {"settings": [{"definitionId": "b", "value": 3}, {"definitionId": "c", "value": 4}]}
    assert field_diff(before, after) == [
        FieldChange("settings[definitionId=a]", "removed", before=before["settings"][0]),
        FieldChange("settings[definitionId=b].value", "changed", 2, 3),
        FieldChange("settings[definitionId=c]", "added", after=after["settings"][1]),
    ]


def test_settings_catalog_settings_match_by_setting_definition_id():
    def setting(index, definition, value):
        return {
            "id": str(index),
            "settingInstance": {"settingDefinitionId": definition, "value": value},
        }

    before = {"settings": [setting(0, "x", 1), setting(1, "y", 2)]}
    after = {"settings": [setting(1, "y", 2), setting(0, "x", 5)]}
    assert field_diff(before, after) == [
        FieldChange(
            "settings[settingInstance.settingDefinitionId=x].settingInstance.value", "changed", 1, 5
        )
    ]


def test_ordered_arrays_compare_by_position_and_scalar_sets_by_value():
    before = {"rules": ["a", "b"], "roleScopeTagIds": ["0", "1"], "n": {"deep": True}}
    after = {"rules": ["b", "a", "c"], "roleScopeTagIds": ["1", "2"], "n": {"deep": False}}
    assert field_diff(before, after) == [
        FieldChange("n.deep", "changed", True, False),
        FieldChange("roleScopeTagIds[]", "removed", before="0"),
        FieldChange("roleScopeTagIds[]", "added", after="2"),
        FieldChange("rules[0]", "changed", "a", "b"),
        FieldChange("rules[1]", "changed", "b", "a"),
        FieldChange("rules[2]", "added", after="c"),
    ]


def test_a_type_change_is_a_change():
    assert field_diff({"v": 1}, {"v": "1"}) == [FieldChange("v", "changed", 1, "1")]


def test_file_names_are_stable_readable_and_safe():
    assert file_stem("Win 10 – Baseline / BitLocker", "abc-1") == (
        "Win-10-Baseline-BitLocker__abc-1"
    )
    assert file_stem("", "id:1") == "unnamed__id-1"
    assert file_stem("../../etc", "x") == "etc__x"


def test_export_text_is_sorted_indented_with_a_trailing_newline():
    assert export_text('{"b":1,"a":{"ü":[1,2]}}') == (
        '{\n  "a": {\n    "ü": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    )


# --- Planning (pure) -------------------------------------------------------------------------

SCHEDULE = store.ScheduleRow(1, "nightly", 1, POLICY_CONTRACTS, 30)


def _run(failures):
    now = datetime.now(UTC)
    return OperationRun(
        7, 1, "backup_schedule.run_now", "completed", "partially_succeeded", "h", {}, {},
        failures, "cli", "me", None, now, now, now, now,
    )  # fmt: skip


def _backup_set(status, failed):
    return store.BackupSet(
        3, 1, "contoso", 1, "nightly", 7, None, datetime.now(UTC), None, 10, status,
        list(POLICY_CONTRACTS),
        [{"reason_code": "provider_permission_denied", "message": "m", "contract_key": k}
         for k in failed],
    )  # fmt: skip


def test_a_fresh_run_reads_every_type_of_its_schedule():
    plan = plan_backup(SCHEDULE)
    assert (plan.read_types, plan.carry_from) == (POLICY_CONTRACTS, None)


def test_a_retry_reads_the_failed_types_and_carries_the_others():
    failed = [
        {"reason_code": "provider_permission_denied", "message": "m", "contract_key": k}
        for k in ("app_protection_ios", "mobile_app_configurations")
    ]
    plan = plan_backup(
        SCHEDULE, _run(failed), _backup_set("partial", [f["contract_key"] for f in failed])
    )
    assert plan.read_types == ("app_protection_ios", "mobile_app_configurations")
    assert plan.carry_from == 3
    assert set(plan.carry_types) == set(POLICY_CONTRACTS) - set(plan.read_types)
    assert plan.policy_types == POLICY_CONTRACTS


def test_a_retry_of_a_run_without_a_usable_set_reads_everything():
    failures = [{"reason_code": "provider_auth_failed", "message": "m"}]
    assert plan_backup(SCHEDULE, _run(failures), None).read_types == POLICY_CONTRACTS
    failed_set = _backup_set("failed", ["device_configurations"])
    assert plan_backup(SCHEDULE, _run(failures), failed_set).read_types == POLICY_CONTRACTS


def test_set_status_partial_only_when_something_was_kept():
    assert set_status(read=5, failed=0, carried=0) == "complete"
    assert set_status(read=5, failed=2, carried=0) == "partial"
    assert set_status(read=5, failed=5, carried=0) == "failed"
    assert set_status(read=1, failed=1, carried=40) == "partial"


# --- Retention (database) --------------------------------------------------------------------


def _record(external_id: str, body: dict) -> store.ItemRecord:
    text = json.dumps({"id": external_id, **body}, sort_keys=True, separators=(",", ":"))
    return store.ItemRecord(
        "device_configurations",
        external_id,
        "device_configuration",
        f"policy {external_id}",
        hashlib.sha256(text.encode()).hexdigest(),
        text,
    )


@pytest.fixture
def engine(tmp_path, database_url):
    return ready_engine(load_config(write_config(tmp_path / "atlas.yaml", database_url)))


def _make_set(engine, age_days, status, records, schedule_key="contoso-nightly"):
    schedule = store.find_schedule(engine, key=schedule_key)
    set_id = store.create_set(
        engine,
        provider_connection_id=schedule.provider_connection_id,
        backup_schedule_id=schedule.id,
        policy_types=["device_configurations"],
    )
    store.store_items(engine, set_id, records)
    failures = (
        [
            {
                "reason_code": "provider_throttled",
                "message": "m",
                "contract_key": "compliance_policies",
            }
        ]
        if status == "partial"
        else []
    )
    store.finish_set(engine, set_id, status, failures)
    s = schema.backup_sets
    with engine.begin() as conn:
        conn.execute(
            s.update()
            .where(s.c.id == set_id)
            .values(created_at=datetime.now(UTC) - timedelta(days=age_days))
        )
    return set_id


def _payload_hashes(engine):
    with engine.connect() as conn:
        return set(conn.execute(sa.select(schema.backup_payloads.c.content_hash)).scalars())


def test_retention_keeps_the_newest_complete_set_and_every_referenced_payload(engine):
    a, b, c, e = (_record(i, {"v": i}) for i in ("a", "b", "c", "e"))
    old_complete = _make_set(engine, 40, "complete", [a, b])
    old_partial = _make_set(engine, 35, "partial", [b, e])
    recent_partial = _make_set(engine, 1, "partial", [c])
    schedule = store.find_schedule(engine, key="contoso-nightly")

    result = store.apply_retention(engine, schedule.id, schedule.retention_days)
    assert result.deleted_sets == [old_partial]
    assert [s.id for s in store.list_sets(engine)] == [recent_partial, old_complete]
    assert _payload_hashes(engine) == {a.content_hash, b.content_hash, c.content_hash}
    assert result.deleted_payloads == 1

    newer_complete = _make_set(engine, 0, "complete", [c])
    result = store.apply_retention(engine, schedule.id, schedule.retention_days)
    assert result.deleted_sets == [old_complete]
    assert [s.id for s in store.list_sets(engine)] == [newer_complete, recent_partial]
    assert _payload_hashes(engine) == {c.content_hash}


def test_retention_leaves_other_schedules_and_their_payloads_alone(engine):
    shared = _record("s", {"v": 1})
    other = _make_set(engine, 400, "complete", [shared])
    nightly = store.find_schedule(engine, key="contoso-nightly")
    with engine.begin() as conn:
        bs = schema.backup_schedules
        conn.execute(
            bs.insert().values(
                key="contoso-weekly",
                provider_connection_id=nightly.provider_connection_id,
                cron="0 3 * * 0",
                timezone="UTC",
                policy_types=["device_configurations"],
                retention_days=365,
                enabled=True,
                created_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
            )
        )
    weekly = _make_set(engine, 400, "complete", [shared], schedule_key="contoso-weekly")
    _make_set(engine, 0, "complete", [_record("n", {"v": 2})])
    assert store.apply_retention(engine, nightly.id, 30).deleted_sets == [other]
    assert weekly in {s.id for s in store.list_sets(engine)}
    assert shared.content_hash in _payload_hashes(engine)


def test_identical_payloads_are_stored_once(engine):
    a = _record("a", {"v": 1})
    _make_set(engine, 0, "complete", [a])
    schedule = store.find_schedule(engine, key="contoso-nightly")
    second = store.create_set(
        engine,
        provider_connection_id=schedule.provider_connection_id,
        backup_schedule_id=schedule.id,
        policy_types=["device_configurations"],
    )
    result = store.store_items(engine, second, [a])
    assert (result.items, result.new_payloads, result.new_payload_bytes) == (1, 0, 0)
    assert len(_payload_hashes(engine)) == 1


# --- The backup job against the simulator ----------------------------------------------------


@dataclass
class Env:
    config: Any
    defs: dg.Definitions
    instance: dg.DagsterInstance
    tenant: SimulatedTenant
    sim: GraphSimulator
    engine: sa.Engine
    ledger: OperationLedger
    root: Path


@pytest.fixture
def make_env(tmp_path, database_url, monkeypatch):
    with ExitStack() as stack:

        def make(profile: str = "small", granted_roles: list[str] | None = None) -> Env:
            cfg = write_config(tmp_path / "atlas.yaml", database_url)
            monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
            config = load_config(cfg)
            tenant = SimulatedTenant.generate(profile, 3)
            sim = GraphSimulator(tenant, granted_roles=granted_roles)
            install_simulator("contoso", sim)
            stack.callback(uninstall_simulator, "contoso")
            instance = stack.enter_context(dg.instance_for_test())
            engine = ready_engine(config)
            return Env(
                config,
                build_definitions(config),
                instance,
                tenant,
                sim,
                engine,
                OperationLedger(engine),
                tmp_path,
            )

        yield make


def _start(env: Env, run_type: str = "backup_schedule.run_now", **kw: Any) -> OperationRun:
    if "retry_of" not in kw:
        kw["schedule"] = "contoso-nightly"
    return start_operation(
        env.config, run_type, defs=env.defs, in_process=True, instance=env.instance, **kw
    ).row


def _backup(env: Env, **kw: Any) -> tuple[OperationRun, store.BackupSet]:
    row = _start(env, **kw)
    return row, store.require_set(env.engine, row.context["backup_schedule_run_id"])


def _exported(directory: Path) -> dict[tuple[str, str], str]:
    manifest = json.loads((directory / MANIFEST).read_text())
    return {
        (f["contract_key"], f["external_id"]): (directory / f["file"]).read_text(encoding="utf-8")
        for f in manifest["files"]
    }


def test_a_large_backup_holds_every_policy_complete_and_exports_it_exactly(make_env):
    env = make_env("large")
    row, backup = _backup(env)
    assert (row.status, row.outcome, backup.status) == ("completed", "succeeded", "complete")
    assert row.context["backup_schedule_run_id"] == backup.id
    expected = {key: env.tenant.policies(key) for key in POLICY_CONTRACTS}
    assert backup.item_count == sum(len(v) for v in expected.values())

    out = env.root / "export"
    result = export_set(env.engine, backup.id, out)
    files = _exported(out)
    assert len(result.files) == len(files) == backup.item_count
    for key, objects in expected.items():
        for obj in objects:
            text = files[(key, obj["id"])]
            assert json.loads(text) == obj  # the payload exactly as Graph returned it
            assert text == json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    # Settings catalog policies spanning several pages of 25 settings came back whole.
    multi_page = [o for o in expected["settings_catalog"] if len(o["settings"]) > 50]
    assert multi_page
    for obj in multi_page:
        assert len(json.loads(files[("settings_catalog", obj["id"])])["settings"]) == len(
            obj["settings"]
        )


def test_exporting_again_is_byte_stable_and_drops_deleted_policies(make_env):
    env = make_env()
    _, first = _backup(env)
    out = env.root / "export"
    export_set(env.engine, first.id, out)
    before = {p: p.read_bytes() for p in out.rglob("*.json") if p.name != MANIFEST}
    victim = next(o for o in env.tenant.policies("device_configurations"))
    env.tenant.delete_policy("device_configurations", victim["id"])
    _, second = _backup(env)
    result = export_set(env.engine, second.id, out)
    after = {p: p.read_bytes() for p in out.rglob("*.json") if p.name != MANIFEST}
    [gone] = result.removed
    assert victim["id"] in gone and (out / gone) not in after
    assert after == {p: b for p, b in before.items() if p != out / gone}


def test_an_unchanged_second_backup_stores_no_new_payloads(make_env):
    env = make_env()
    first_row, first = _backup(env)
    second_row, second = _backup(env)
    assert first_row.summary_counts["new_payloads"] > 0
    assert second_row.summary_counts["new_payloads"] == 0
    assert second_row.summary_counts["new_payload_bytes"] == 0
    assert second_row.summary_counts["changed_since_previous"] == {
        "added": 0,
        "removed": 0,
        "changed": 0,
    }
    old, new = store.set_items(env.engine, first.id), store.set_items(env.engine, second.id)
    assert {k: v.content_hash for k, v in old.items()} == {
        k: v.content_hash for k, v in new.items()
    }


def test_diff_after_tenant_changes_lists_exactly_the_changed_policies_and_fields(make_env):
    env = make_env()
    _, first = _backup(env)
    t = env.tenant
    renamed = t.policies("device_configurations")[0]
    t.update_policy("device_configurations", renamed["id"], {"displayName": "Renamed policy"})
    catalog = next(o for o in t.stored_policies("settings_catalog") if o["settings"])
    settings = json.loads(json.dumps(catalog["settings"]))
    setting = settings[-1]["settingInstance"]
    setting["choiceSettingValue"]["value"] += "_changed"
    t.update_policy("settings_catalog", catalog["id"], {"settings": settings})
    reassigned = next(o for o in t.stored_policies("compliance_policies") if o["assignments"])
    dropped = reassigned["assignments"][0]
    t.set_assignments("compliance_policies", reassigned["id"], reassigned["assignments"][1:])
    added = t.add_policy("powershell_scripts")
    deleted = t.policies("feature_update_profiles")[0]
    t.delete_policy("feature_update_profiles", deleted["id"])
    t.update_group(t.random_group_id(random.Random(1)), {"displayName": "Renamed group"})
    _, second = _backup(env)

    diff = diff_sets(env.engine, first.id, second.id)
    assert diff.skipped_types == []
    assert [(p.contract_key, p.external_id) for p in diff.added] == [
        ("powershell_scripts", added["id"])
    ]
    assert [(p.contract_key, p.external_id) for p in diff.removed] == [
        ("feature_update_profiles", deleted["id"])
    ]
    changes = {
        (c.policy.contract_key, c.policy.external_id): [(f.path, f.kind) for f in c.fields]
        for c in diff.changed
    }
    definition = setting["settingDefinitionId"]
    assert changes == {
        ("device_configurations", renamed["id"]): [("displayName", "changed")],
        ("settings_catalog", catalog["id"]): [
            (
                f"settings[settingInstance.settingDefinitionId={definition}]"
                ".settingInstance.choiceSettingValue.value",
                "changed",
            )
        ],
        ("compliance_policies", reassigned["id"]): [
            (f"assignments[id={dropped['id']}]", "removed")
        ],
    }
    # The same through the CLI, as JSON.
    code, out = _cli(env, "backups", "diff", str(first.id), str(second.id), "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(diff.to_dict(), default=str))


def test_a_403_on_one_type_makes_the_set_partial_and_a_retry_completes_only_that_type(
    make_env,
):
    roles = [r for r in all_permissions() if r != APPS]
    env = make_env(granted_roles=roles)
    denied = {k for k in POLICY_CONTRACTS if APPS in CONTRACTS[k].permissions}
    row, partial = _backup(env)
    assert (row.outcome, partial.status) == ("partially_succeeded", "partial")
    assert {f["contract_key"] for f in partial.failure_summary} == denied
    assert {f["reason_code"] for f in partial.failure_summary} == {"provider_permission_denied"}
    assert {f["contract_key"] for f in row.failure_summary} == denied
    held = {k for k, _ in store.set_items(env.engine, partial.id)}
    assert held == {k for k in POLICY_CONTRACTS if env.tenant.policies(k)} - denied
    checks = {
        c["contract_key"]: c["status"]
        for c in latest_checks(env.engine, row.provider_connection_id)
    }
    assert all(checks[k] == "missing_permission" for k in denied)

    env.sim.granted_roles = all_permissions()
    env.sim.stats.reset()
    retry, retried = _backup(env, run_type="backup_schedule.retry", retry_of=row.id)
    assert (retry.outcome, retried.status) == ("succeeded", "complete")
    assert retry.context["retry_of"] == row.id
    assert retried.backup_schedule_id == partial.backup_schedule_id
    read = {k for k in env.sim.stats.per_contract if k in CONTRACTS and CONTRACTS[k].policy}
    assert read == denied
    assert retry.summary_counts["items_carried"] == partial.item_count
    items = store.set_items(env.engine, retried.id)
    for key in POLICY_CONTRACTS:
        assert {i for k, i in items if k == key} == {o["id"] for o in env.tenant.policies(key)}


def test_a_backup_that_fails_before_reading_finishes_its_set_as_failed(make_env, monkeypatch):
    env = make_env()

    def unreadable(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(store, "cached_names", unreadable)
    row, backup_set = _backup(env)
    assert row.outcome == "failed"
    assert backup_set.status == store.SET_FAILED  # not left "running"
    assert backup_set.failure_summary == [
        {"reason_code": "internal_error", "message": "RuntimeError: database went away"}
    ]


def test_policies_that_share_a_display_name_are_all_kept(make_env):
    env = make_env()
    twin = env.tenant.policies("device_configurations")[0]
    copies = [
        env.tenant.add_policy("device_configurations", {**twin, "id": f"twin-{n}"})
        for n in range(2)
    ]
    _, backup = _backup(env)
    named = [
        i
        for i in store.set_items(env.engine, backup.id).values()
        if i.display_name == twin["displayName"] and i.contract_key == "device_configurations"
    ]
    assert {i.external_id for i in named} >= {twin["id"], *(c["id"] for c in copies)}
    result = export_set(env.engine, backup.id, env.root / "export")
    assert len(result.files) == backup.item_count


def test_assignment_names_are_recorded_from_the_cached_tables(make_env):
    env = make_env()
    for run_type in ("directory_groups.sync", "inventory.sync"):
        assert _start(env, run_type, connection="contoso").outcome == "succeeded"
    env.sim.stats.reset()
    _, backup = _backup(env)
    assert env.sim.stats.total > 0
    assert "groups_delta" not in env.sim.stats.per_contract  # names come from the cache
    export_set(env.engine, backup.id, env.root / "export")
    manifest = json.loads((env.root / "export" / MANIFEST).read_text())
    groups = {g["id"]: g["displayName"] for g in env.tenant.groups()}
    filters = {f["id"]: f["displayName"] for f in env.tenant.policies("assignment_filters")}
    seen_group = seen_filter = 0
    for entry in manifest["files"]:
        for a in entry["assignments"]:
            if a["group_id"] in groups:
                assert a["group_name"] == groups[a["group_id"]]
                seen_group += 1
            if a["filter_id"]:
                assert a["filter_name"] == filters[a["filter_id"]]
                seen_filter += 1
    assert seen_group and seen_filter


def test_materialisation_metadata_and_ledger_point_at_the_set(make_env):
    env = make_env()
    row, backup = _backup(env)
    event = env.instance.get_latest_materialization_event(dg.AssetKey("backups"))
    meta = event.asset_materialization.metadata
    assert event.asset_materialization.partition == "contoso"
    assert meta["items"].value == backup.item_count
    assert meta["backup_set_id"].value == backup.id
    assert meta["operation_run_id"].value == row.id
    assert meta["new_payloads"].value == row.summary_counts["new_payloads"] > 0
    assert meta["changed_since_previous"].value == {
        "added": backup.item_count,
        "removed": 0,
        "changed": 0,
    }
    assert related_links(row, "http://ui")["backup_set"].endswith(f"export {backup.id}")


def test_a_scheduled_tick_runs_a_backup_recording_its_scheduled_time(make_env):
    env = make_env()
    when = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    schedule = env.defs.get_schedule_def("backup_schedule__contoso_nightly")
    ledger_resource = LedgerResource()
    with dg.build_schedule_context(
        instance=env.instance,
        scheduled_execution_time=when,
        resources={"ledger": ledger_resource},
        repository_def=env.defs.get_repository_def(),
    ) as context:
        [request] = schedule.evaluate_tick(context).run_requests
    result = env.defs.resolve_job_def("backup_job").execute_in_process(
        instance=env.instance,
        partition_key=request.partition_key,
        tags=request.tags,
        raise_on_error=False,
    )
    assert result.success
    row = mirror_run_id(env.ledger, env.instance, result.run_id)
    backup = store.require_set(env.engine, row.context["backup_schedule_run_id"])
    assert (row.type, row.outcome) == ("backup_schedule.scheduled", "succeeded")
    assert backup.scheduled_for == when
    assert backup.operation_run_id == row.id


def test_a_run_launched_from_the_dagster_ui_without_tags_backs_up_the_only_schedule(make_env):
    env = make_env()
    ensure_partitions(env.instance, ["contoso"])
    result = env.defs.resolve_job_def("backup_job").execute_in_process(
        instance=env.instance, partition_key="contoso", raise_on_error=False
    )
    assert result.success
    row = mirror_run_id(env.ledger, env.instance, result.run_id)
    backup = store.require_set(env.engine, row.context["backup_schedule_run_id"])
    assert (row.type, row.trigger_source, row.outcome) == (
        "backup_schedule.run_now",
        "dagster_ui",
        "succeeded",
    )
    assert (backup.backup_schedule, backup.status) == ("contoso-nightly", "complete")


def test_cli_lists_and_exports_sets_and_rejects_unknown_ones(make_env):
    env = make_env()
    _, backup = _backup(env)
    code, out = _cli(env, "backups", "list", "--json")
    assert code == 0
    [listed] = json.loads(out)["backup_sets"]
    assert (listed["id"], listed["status"], listed["backup_schedule"]) == (
        backup.id,
        "complete",
        "contoso-nightly",
    )
    code, out = _cli(env, "backups", "export", str(backup.id), str(env.root / "cli-export"))
    assert code == 0 and f"{backup.item_count} files" in out
    assert _cli(env, "backups", "diff", str(backup.id), "999")[0] == 2


def _cli(env: Env, *args: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = cli.main(list(args))
    return code, buffer.getvalue()


def test_retry_of_is_checked_even_when_a_schedule_is_named(make_env):
    env = make_env()
    ok, _ = _backup(env)
    inventory = start_operation(
        env.config,
        "inventory.sync",
        defs=env.defs,
        connection="contoso",
        in_process=True,
        instance=env.instance,
    ).row
    before = len(env.ledger.list())
    bad = [
        (10_000, "backup_schedule.retry", "is not a backup run"),  # no such run
        (inventory.id, "backup_schedule.retry", "is not a backup run"),
        (ok.id, "backup_schedule.retry", "only failed or partially succeeded"),
        (ok.id, "backup_schedule.run_now", "applies to backup_schedule.retry only"),
    ]
    for retry_of, run_type, message in bad:
        with pytest.raises(StartError, match=message):
            _start(env, run_type, retry_of=retry_of, schedule="contoso-nightly")
    assert len(env.ledger.list()) == before, "a refused retry creates no row"
