"""Verification of a connection: sign-in, permissions per contract, probes, ledger outcome."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from atlas_dagster import db
from atlas_dagster.assets.verification import VERIFIED_CONTRACTS
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.reasons import PROVIDER_PERMISSION_DENIED, GraphError
from atlas_dagster.simulator import FaultPlan
from atlas_dagster.stores.checks import latest_checks, record_checks, record_denied
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, all_permissions, write_permissions
from tests.conftest import write_config

APPS = "DeviceManagementApps.Read.All"
CA = "conditional_access_policies"
WRITABLE = [k for k in POLICY_CONTRACTS if CONTRACTS[k].writes is not None]


@pytest.fixture
def env(contoso_env):
    return contoso_env


def _start_verify(env):
    return start_operation(
        env["config"],
        "provider_connection.verify",
        defs=env["defs"],
        connection="contoso",
        in_process=True,
        instance=env["instance"],
    )


def _verify(env):
    return _start_verify(env).row


def _checks(env, row):
    return {c["contract_key"]: c for c in latest_checks(env["engine"], row.provider_connection_id)}


def test_full_permissions_make_every_contract_ready(env):
    row = _verify(env)
    assert (row.status, row.outcome, row.failure_summary) == ("completed", "succeeded", [])
    checks = _checks(env, row)
    assert set(checks) == set(VERIFIED_CONTRACTS)
    assert {c["status"] for c in checks.values()} == {"ready"}
    assert row.summary_counts["contracts_ready"] == len(VERIFIED_CONTRACTS)


def test_missing_apps_permission_names_it_for_exactly_the_app_contracts(env):
    env["sim"].granted_roles = [r for r in env["sim"].granted_roles if r != APPS]
    row = _verify(env)
    assert (row.status, row.outcome) == ("completed", "failed")
    assert {f["reason_code"] for f in row.failure_summary} == {"provider_permission_denied"}
    missing = {k: c for k, c in _checks(env, row).items() if c["status"] != "ready"}
    expected = {
        "app_protection_ios",
        "app_protection_android",
        "app_protection_windows",
        "app_protection_mdm_wip",
        "managed_app_configurations",
        "mobile_app_configurations",
    }
    assert set(missing) == expected
    assert all(
        c["status"] == "missing_permission" and c["missing_permissions"] == [APPS]
        for c in missing.values()
    )
    assert {f["contract_key"] for f in row.failure_summary} == expected


def test_wrong_secret_is_auth_failed_and_probes_nothing(env):
    env["sim"].client_secret = "not-the-secret"
    env["sim"].stats.reset()
    row = _verify(env)
    assert (row.status, row.outcome) == ("completed", "failed")
    assert [f["reason_code"] for f in row.failure_summary] == ["provider_auth_failed"]
    assert "AADSTS" in row.failure_summary[0]["message"]
    assert env["sim"].stats.total == 0  # no Graph request was made
    assert {c["reason_code"] for c in _checks(env, row).values()} == {"provider_auth_failed"}


# --- Write readiness (restore) ----------------------------------------------------------------


def _write(checks):
    return {k: (c["write_status"], c["write_missing_permissions"]) for k, c in checks.items()}


def test_a_read_only_app_lacks_each_write_permission_and_still_verifies(env):
    row = _verify(env)
    assert (row.outcome, row.failure_summary) == ("succeeded", [])
    checks = _checks(env, row)
    assert {c["status"] for c in checks.values()} == {"ready"}
    writes = _write(checks)
    # Intune collections name the ReadWrite form of the permission they read with; CA writes
    # need two permissions a read-only app lacks (Policy.Read.All it holds).
    expected = {
        k: ("missing_permission", [CONTRACTS[k].permissions[0].replace(".Read.", ".ReadWrite.")])
        for k in WRITABLE
    } | {CA: ("missing_permission", ["Application.Read.All", "Policy.ReadWrite.ConditionalAccess"])}
    expected |= {k: ("not_writable", []) for k in POLICY_CONTRACTS if k not in WRITABLE}
    expected["groups_delta"] = (None, None)
    assert writes == expected
    assert row.summary_counts["contracts_write_ready"] == 0
    assert row.summary_counts["contracts_write_missing_permission"] == len(WRITABLE)


def test_write_permissions_granted_make_every_writable_contract_ready(env):
    env["sim"].granted_roles = [*all_permissions(), *write_permissions()]
    row = _verify(env)
    assert (row.outcome, row.failure_summary) == ("succeeded", [])
    writes = _write(_checks(env, row))
    assert {k: writes[k] for k in WRITABLE} == {k: ("ready", []) for k in WRITABLE}
    assert writes["groups_delta"] == (None, None)
    assert row.summary_counts["contracts_write_ready"] == len(WRITABLE)
    assert row.summary_counts["contracts_write_missing_permission"] == 0


def test_conditional_access_writes_need_application_read_too(env):
    env["sim"].granted_roles = [*all_permissions(), "Policy.ReadWrite.ConditionalAccess"]
    row = _verify(env)
    assert row.outcome == "succeeded"
    writes = _write(_checks(env, row))
    assert writes[CA] == ("missing_permission", ["Application.Read.All"])
    assert writes["settings_catalog"] == (
        "missing_permission",
        ["DeviceManagementConfiguration.ReadWrite.All"],
    )


def test_a_missing_read_permission_still_reports_write_readiness(env):
    env["sim"].granted_roles = [
        *(r for r in all_permissions() if r != APPS),
        "DeviceManagementConfiguration.ReadWrite.All",
    ]
    row = _verify(env)
    assert row.outcome == "failed"  # the reads decide the outcome, as without write readiness
    assert {f["reason_code"] for f in row.failure_summary} == {PROVIDER_PERMISSION_DENIED}
    checks = _checks(env, row)
    assert checks["app_protection_ios"]["status"] == "missing_permission"
    assert _write(checks)["app_protection_ios"] == (
        "missing_permission",
        ["DeviceManagementApps.ReadWrite.All"],
    )
    assert _write(checks)["settings_catalog"] == ("ready", [])


def test_a_policy_collection_graph_cannot_write_is_not_writable(env, monkeypatch):
    contract = CONTRACTS["device_categories"]
    monkeypatch.setitem(CONTRACTS, contract.key, dataclasses.replace(contract, writes=None))
    row = _verify(env)
    assert row.outcome == "succeeded"
    assert _write(_checks(env, row))[contract.key] == ("not_writable", [])
    counts = row.summary_counts
    assert counts["contracts_write_missing_permission"] == len(WRITABLE) - 1
    assert counts["contracts_write_ready"] == 0


def test_failed_sign_in_clears_write_readiness(env):
    # An earlier verification's readiness; a second one in this process would reuse its token.
    conn_id = db.connection_ids(env["engine"])["contoso"]
    earlier = {"status": "ready", "write_status": "ready", "write_missing_permissions": []}
    record_checks(env["engine"], conn_id, [{"contract_key": CA, **earlier}], None)
    env["sim"].client_secret = "not-the-secret"
    row = _verify(env)
    assert row.outcome == "failed"
    assert set(_write(_checks(env, row)).values()) == {(None, None)}


def test_a_403_met_by_a_read_keeps_the_write_readiness(env):
    row = _verify(env)
    denied = GraphError(PROVIDER_PERMISSION_DENIED, "denied", contract_key="settings_catalog")
    record_denied(env["engine"], row.provider_connection_id, denied, row.id)
    check = _checks(env, row)["settings_catalog"]
    assert (check["status"], check["missing_permissions"]) == (
        "missing_permission",
        ["DeviceManagementConfiguration.Read.All"],
    )
    assert (check["write_status"], check["write_missing_permissions"]) == (
        "missing_permission",
        ["DeviceManagementConfiguration.ReadWrite.All"],
    )


def test_a_failing_probe_is_partial_not_failed(env):
    env["sim"].faults.once("/deviceManagement/deviceCategories", "503", count=20)
    row = _verify(env)
    assert row.outcome == "partially_succeeded"
    checks = _checks(env, row)
    assert checks["device_categories"]["status"] == "probe_failed"
    assert checks["device_categories"]["reason_code"] == "provider_unavailable"


def test_verifications_started_while_one_runs_share_its_ledger_row(env):
    env["sim"].faults = FaultPlan(latency_s=0.05)  # one verification takes a second or two
    ledger = OperationLedger(env["engine"])
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(_start_verify, env)
        deadline = time.monotonic() + 30
        while not ledger.list(type="provider_connection.verify", status="running"):
            assert time.monotonic() < deadline, "the first verification never started"
            time.sleep(0.02)
        later = [_start_verify(env) for _ in range(3)]
        running = first.result()
    assert running.created and running.row.outcome == "succeeded"
    assert {o.row.id for o in later} == {running.row.id}
    assert not any(o.created or o.dispatched for o in later)
    assert len(ledger.list(type="provider_connection.verify")) == 1


def test_cli_verify_prints_the_table_and_json(tmp_path):
    cfg = write_config(tmp_path / "atlas.yaml", f"sqlite:///{tmp_path / 'cli.db'}")
    env = {**os.environ, "ATLAS_CONFIG": str(cfg)}
    table = subprocess.run(
        [sys.executable, "-m", "atlas_dagster.cli", "verify", "--connection", "contoso"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    assert "contract" in table.stdout and "ready" in table.stdout
    assert CONTRACTS["settings_catalog"].title in table.stdout
    header = table.stdout.splitlines()[0].split()
    assert header[-1] == "write"
    assert "missing_permission: DeviceManagementConfiguration.ReadWrite.All" in table.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "atlas_dagster.cli", "verify", "--connection", "contoso", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["operation_run"]["outcome"] == "succeeded"
    assert len(doc["checks"]) == len(VERIFIED_CONTRACTS)
    by_key = {c["contract_key"]: c for c in doc["checks"]}
    assert by_key[CA]["write_missing_permissions"] == [
        "Application.Read.All",
        "Policy.ReadWrite.ConditionalAccess",
    ]
