"""Backups: the store (payloads once per content hash, diff, export, retention), the backup job
against the Graph simulator, partial sets and retries."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from atlas_dagster import backup_store as store
from atlas_dagster import schema
from atlas_dagster.assets.backups import plan_backup, set_status
from atlas_dagster.config import load_config
from atlas_dagster.resources.database import ready_engine
from atlas_dagster.resources.ledger import OperationRun
from graph_contracts import POLICY_CONTRACTS
from tests.conftest import write_config

# --- Field diff (pure) ---------------------------------------------------------------------


def test_reordered_unordered_arrays_are_no_change():
    before = {"settings": [{"definitionId": "a", "value": 1}, {"definitionId": "b", "value": 2}]}
    after = {"settings": [{"definitionId": "b", "value": 2}, {"definitionId": "a", "value": 1}]}
    assert store.field_diff(before, after) == []


def test_unordered_elements_are_matched_by_identity_and_diffed_by_field():
    before = {"settings": [{"definitionId": "a", "value": 1}, {"definitionId": "b", "value": 2}]}
    after = {"settings": [{"definitionId": "b", "value": 3}, {"definitionId": "c", "value": 4}]}
    assert store.field_diff(before, after) == [
        store.FieldChange("settings[definitionId=a]", "removed", before=before["settings"][0]),
        store.FieldChange("settings[definitionId=b].value", "changed", 2, 3),
        store.FieldChange("settings[definitionId=c]", "added", after=after["settings"][1]),
    ]


def test_settings_catalog_settings_match_by_setting_definition_id():
    def setting(index, definition, value):
        return {
            "id": str(index),
            "settingInstance": {"settingDefinitionId": definition, "value": value},
        }

    before = {"settings": [setting(0, "x", 1), setting(1, "y", 2)]}
    after = {"settings": [setting(1, "y", 2), setting(0, "x", 5)]}
    assert store.field_diff(before, after) == [
        store.FieldChange(
            "settings[settingInstance.settingDefinitionId=x].settingInstance.value", "changed", 1, 5
        )
    ]


def test_ordered_arrays_compare_by_position_and_scalar_sets_by_value():
    before = {"rules": ["a", "b"], "roleScopeTagIds": ["0", "1"], "n": {"deep": True}}
    after = {"rules": ["b", "a", "c"], "roleScopeTagIds": ["1", "2"], "n": {"deep": False}}
    assert store.field_diff(before, after) == [
        store.FieldChange("n.deep", "changed", True, False),
        store.FieldChange("roleScopeTagIds[]", "removed", before="0"),
        store.FieldChange("roleScopeTagIds[]", "added", after="2"),
        store.FieldChange("rules[0]", "changed", "a", "b"),
        store.FieldChange("rules[1]", "changed", "b", "a"),
        store.FieldChange("rules[2]", "added", after="c"),
    ]


def test_a_type_change_is_a_change():
    assert store.field_diff({"v": 1}, {"v": "1"}) == [store.FieldChange("v", "changed", 1, "1")]


def test_file_names_are_stable_readable_and_safe():
    assert store.file_stem("Win 10 – Baseline / BitLocker", "abc-1") == (
        "Win-10-Baseline-BitLocker__abc-1"
    )
    assert store.file_stem("", "id:1") == "unnamed__id-1"
    assert store.file_stem("../../etc", "x") == "etc__x"


def test_export_text_is_sorted_indented_with_a_trailing_newline():
    assert store.export_text('{"b":1,"a":{"ü":[1,2]}}') == (
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
        operation_run_id=None,
        scheduled_for=None,
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
        operation_run_id=None,
        scheduled_for=None,
        policy_types=["device_configurations"],
    )
    result = store.store_items(engine, second, [a])
    assert (result.items, result.new_payloads, result.new_payload_bytes) == (1, 0, 0)
    assert len(_payload_hashes(engine)) == 1
