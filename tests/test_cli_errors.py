"""What `atlas-dagster` answers when things go wrong (DESIGN §8): one line per error, the trace
only behind `-v`, exit codes 0/1/2/3, and `start` saying what it did."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlas_dagster import cli, db
from atlas_dagster.config import load_config
from atlas_dagster.db import ready_engine
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.reasons import failure
from graph_contracts import POLICY_CONTRACTS
from tests.conftest import write_config

APPS = "DeviceManagementApps.Read.All"
CLI = (sys.executable, "-m", "atlas_dagster.cli")


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
    return cfg


@pytest.fixture
def ledger(config_file: Path) -> OperationLedger:
    return OperationLedger(ready_engine(load_config(config_file)))


def _queued_by_schedule(ledger: OperationLedger) -> OperationRun:
    """An inventory sync a refresh schedule queued a moment ago."""
    conn_id = db.connection_ids(ledger.engine)["contoso"]
    started = ledger.start(
        "inventory.sync",
        provider_connection_id=conn_id,
        trigger_source="schedule",
        initiator="refresh_schedule",
        context={"provider_connection_key": "contoso"},
    )
    assert started.created
    return started.row


def _main(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return code, out.splitlines(), err.splitlines()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_failed_in_process_start_ends_with_its_reason_in_one_line_and_no_trace(
    config_file, contoso_sim, capfd
):
    contoso_sim.client_secret = "not-the-app-secret"
    code, out, err = _main(
        capfd, "start", "inventory.sync", "--connection", "contoso", "--in-process"
    )
    assert code == 1
    assert len(out) == 1 and "completed/failed" in out[0], out
    assert len(err) == 1, err
    assert err[0].startswith("error: provider_auth_failed: token request for tenant "), err


def test_verbose_flag_adds_the_dagster_trace_before_the_line(config_file, contoso_sim, capfd):
    contoso_sim.client_secret = "not-the-app-secret"
    code, _, err = _main(
        capfd, "-v", "start", "inventory.sync", "--connection", "contoso", "--in-process"
    )
    assert code == 1
    assert "Stack Trace:" in err and any("GraphError" in line for line in err), err
    assert err[-1].startswith("error: provider_auth_failed: "), err


def test_partially_succeeded_start_exits_3_with_a_warning_line(config_file, contoso_sim, capfd):
    contoso_sim.granted_roles = [r for r in contoso_sim.granted_roles if r != APPS]
    code, out, err = _main(
        capfd, "start", "inventory.sync", "--connection", "contoso", "--in-process"
    )
    assert code == 3
    assert "completed/partially_succeeded" in out[0], out
    [line] = err
    match = re.fullmatch(
        r"warning: provider_permission_denied: .+ \(and \d+ more: atlas-dagster runs --id (\d+) "
        r"--json\)",
        line,
    )
    assert match, line
    assert out[0].startswith(f"#{match.group(1)} "), out


@pytest.mark.parametrize(
    "command",
    [
        ["start", "inventory.sync", "--connection", "contoso"],
        ["start", "inventory.sync", "--connection", "contoso", "--in-process"],
        ["verify", "--connection", "contoso"],
        ["runs"],
        ["db", "upgrade"],
        ["db", "grant-readonly", "analysts"],
        ["backups", "list"],
        ["demo"],
    ],
    ids=" ".join,
)
def test_broken_config_is_its_one_line_and_exit_2_for_every_command(tmp_path, command):
    cfg = write_config(tmp_path / "atlas.yaml", f"sqlite:///{tmp_path / 'atlas.db'}")
    cfg.write_text(cfg.read_text().replace('cron: "0 2 * * *"', 'cron: "61 * * * *"'))
    done = _cli(*command, env={"ATLAS_CONFIG": str(cfg)})
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {cfg}") and "cron" in line, line
    assert done.stdout == ""
    assert not (tmp_path / "atlas.db").exists()


def test_start_json_says_it_created_and_dispatched_the_run(config_file, contoso_sim, capfd):
    code, out, _ = _main(
        capfd, "start", "inventory.sync", "--connection", "contoso", "--in-process", "--json"
    )
    assert code == 0
    doc = json.loads("\n".join(out))
    assert set(doc) == {"operation_run", "created", "dispatched"}
    assert (doc["created"], doc["dispatched"]) == (True, True)
    assert (doc["operation_run"]["status"], doc["operation_run"]["outcome"]) == (
        "completed",
        "succeeded",
    )


def test_start_that_meets_an_active_row_says_so_and_runs_nothing(ledger, capfd):
    queued = _queued_by_schedule(ledger)
    args = ("start", "inventory.sync", "--connection", "contoso", "--in-process")
    code, out, err = _main(capfd, *args, "--json")
    assert code == 0 and err == []
    doc = json.loads("\n".join(out))
    assert (doc["created"], doc["dispatched"]) == (False, False)
    assert (doc["operation_run"]["id"], doc["operation_run"]["trigger_source"]) == (
        queued.id,
        "schedule",
    )

    code, out, err = _main(capfd, *args)
    assert code == 0 and err == []
    created = queued.created_at.strftime("%H:%M:%S")
    assert out == [f"already queued as #{queued.id} (schedule, created {created} UTC)"]
    assert [r.id for r in ledger.list(type="inventory.sync")] == [queued.id]
    assert ledger.get(queued.id).status == "queued"


def test_start_with_wait_that_meets_an_active_row_waits_for_it_and_exits_by_its_outcome(
    ledger, config_file
):
    queued = _queued_by_schedule(ledger)
    proc = subprocess.Popen(
        [*CLI, "start", "inventory.sync", "--connection", "contoso", "--in-process", "--wait"],
        env={**os.environ, "ATLAS_CONFIG": str(config_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"already queued as #{queued.id} (schedule, "), first
        held = failure("provider_permission_denied", "no consent for app protection", "apps")
        assert ledger.complete(queued.id, "partially_succeeded", failures=[held])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, err
    assert out.splitlines()[0].startswith(f"#{queued.id}  inventory.sync  completed/partially_")
    assert err.splitlines() == [
        "warning: provider_permission_denied: no consent for app protection"
    ]


def test_wait_that_runs_out_of_time_exits_1_naming_the_row(ledger, capfd):
    queued = _queued_by_schedule(ledger)
    code, _, err = _main(
        capfd, "start", "inventory.sync", "--connection", "contoso", "--wait", "--timeout", "0.2"
    )
    assert code == 1
    assert err == [f"error: #{queued.id} is still queued after 0.2 s"]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_start_json_says_created_but_not_dispatched_when_the_webserver_is_away(
    tmp_path, sqlite_url, refusing_port, monkeypatch, capfd
):
    cfg = write_config(
        tmp_path / "atlas.yaml",
        sqlite_url,
        f"dagster_webserver_url: http://127.0.0.1:{refusing_port}\n",
    )
    monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
    code, out, err = _main(capfd, "start", "inventory.sync", "--connection", "contoso", "--json")
    assert code == 1
    doc = json.loads("\n".join(out))
    assert (doc["created"], doc["dispatched"]) == (True, False)
    assert doc["operation_run"]["outcome"] == "failed"
    assert [f["reason_code"] for f in doc["operation_run"]["failure_summary"]] == [
        "dispatch_failed"
    ]
    assert len(err) == 1 and err[0].startswith("error: dispatch failed: "), err


def test_runs_json_is_one_object_with_rows_under_operation_runs(ledger, capfd):
    queued = _queued_by_schedule(ledger)
    code, out, _ = _main(capfd, "runs", "--json")
    assert code == 0
    assert [r["id"] for r in json.loads("\n".join(out))["operation_runs"]] == [queued.id]
    code, out, _ = _main(capfd, "runs", "--id", str(queued.id), "--json")
    assert code == 0
    assert json.loads("\n".join(out))["operation_run"]["id"] == queued.id


def test_accept_deletions_is_refused_for_other_run_types_and_creates_nothing(ledger, capfd):
    code, out, err = _main(
        capfd, "start", "directory_groups.sync", "--connection", "contoso", "--accept-deletions"
    )
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("error: ") and "inventory.sync" in err[0], err
    assert ledger.list() == []


def test_mass_deletion_hold_exits_3_and_accept_deletions_applies_it_once(
    config_file, contoso_sim, capfd
):
    start = ("start", "inventory.sync", "--connection", "contoso", "--in-process")
    assert _main(capfd, *start)[0] == 0
    tenant = contoso_sim.tenant
    key = max(POLICY_CONTRACTS, key=lambda k: len(tenant.policies(k)))
    gone = [obj["id"] for obj in tenant.policies(key)]
    for external_id in gone:
        tenant.delete_policy(key, external_id)

    code, _, err = _main(capfd, *start)
    assert code == 3
    [line] = err
    assert line.startswith(f"warning: mass_deletion_held: mass-deletion guard: {len(gone)} of ")
    assert line.endswith(
        "accept these deletions once: atlas-dagster start inventory.sync --connection contoso "
        "--accept-deletions"
    ), line

    code, out, err = _main(capfd, *start, "--accept-deletions", "--json")
    assert (code, err) == (0, [])
    row = json.loads("\n".join(out))["operation_run"]
    assert (row["outcome"], row["summary_counts"]["deletions_accepted"]) == (
        "succeeded",
        len(gone),
    )
    assert _main(capfd, *start)[0] == 0
