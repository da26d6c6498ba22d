"""End to end: a real ``dagster-daemon`` and ``dagster-webserver`` on a PostgreSQL-backed
``DAGSTER_HOME`` keep the ``operation_runs`` ledger true for runs that succeed, fail, are
cancelled, lose their worker to SIGKILL, or were launched without the ledger tag (issue 2).

Connections: ``ok`` is a simulated tenant; ``down`` points at a closed port (every request is
refused); ``hang`` points at a socket that accepts connections and never answers, so its runs
stay busy until the test kills or cancels them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster import DagsterEventType, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from atlas_dagster.db import sqlalchemy_url
from atlas_dagster.ledger.run_types import TAG_OPERATION_RUN_ID
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from tests.dagster_procs import (
    BIN,
    LOCATION_NAME,
    ProcessGroup,
    dagster_processes,
    free_port,
    process_env,
    write_instance,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    # Raised inside dagster_graphql's own client (gql 4 deprecated its call style).
    pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning"),
]

TERMINAL_WAIT = 120.0
# Allow for the database's rounding of the run's start/end times.
CLOCK_TOLERANCE_S = 1.0
WORKER_STARTED = re.compile(r"Started process for run \(pid: (\d+)\)")


@pytest.fixture
def unanswering_port() -> Iterator[int]:
    """A port whose socket completes TCP handshakes (the backlog does) but never reads or
    answers: an HTTP client waits there until its own timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _config(path: Path, database_url: str, web_port: int, down: int, hang: int) -> Path:
    remote = """
    tenant_id: 11111111-1111-4111-8111-111111111111
    client_id: 22222222-2222-4222-8222-222222222222
    client_secret: ${E2E_CLIENT_SECRET}"""
    path.write_text(
        f"""\
database_url: {database_url}
dagster_webserver_url: http://127.0.0.1:{web_port}
provider_connections:
  - key: ok
    display_name: Simulated tenant
    simulated: {{profile: small, seed: 11}}
  - key: down
    display_name: Graph refuses connections{remote}
    graph_base_url: http://127.0.0.1:{down}
    login_base_url: http://127.0.0.1:{down}
  - key: hang
    display_name: Graph never answers{remote}
    graph_base_url: http://127.0.0.1:{hang}
    login_base_url: http://127.0.0.1:{hang}
"""
    )
    return path


def _cli_start(
    group: ProcessGroup, run_type: str, connection: str, *, new: bool = True
) -> dict[str, Any]:
    """``atlas-dagster start TYPE --connection K --json``: submits through the webserver. With
    ``new=False`` an active row of the same identity may come back instead."""
    done = subprocess.run(
        [str(BIN / "atlas-dagster"), "start", run_type, "--connection", connection, "--json"],
        cwd=group.cwd,
        env=group.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    row = answer["operation_run"]
    if new or answer["created"]:
        assert (answer["created"], answer["dispatched"]) == (True, True), answer
        assert row["status"] == "queued" and row["dagster_run_id"], row
    return row


def _worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the engine event it reports as it starts."""
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=50, ascending=True
    ).records
    for record in records:
        found = WORKER_STARTED.search(record.event_log_entry.message or "")
        if found:
            return int(found.group(1))
    return None


def _within(moment: datetime, start: float | None, end: float | None) -> bool:
    low = (start or end or 0.0) - CLOCK_TOLERANCE_S
    return low <= moment.timestamp() <= (end or low) + CLOCK_TOLERANCE_S


def test_daemon_mirror_completes_every_row_with_dagster_times_and_reasons(
    tmp_path: Path, pg_pair: tuple[str, str], unanswering_port: int
) -> None:
    app_url, dagster_url = pg_pair
    home = Path(os.environ["DAGSTER_HOME"])
    write_instance(home, dagster_url)
    web_port = free_port()
    config = _config(tmp_path / "atlas.yaml", app_url, web_port, free_port(), unanswering_port)
    env = process_env(home, config, E2E_CLIENT_SECRET="e2e-not-a-real-secret")
    engine = sa.create_engine(sqlalchemy_url(app_url))
    ledger = OperationLedger(engine)
    # Opening the instance here creates Dagster's schema before the webserver and the daemon
    # both try to at once.
    instance = dg.DagsterInstance.get()
    try:
        with dagster_processes(env, tmp_path, tmp_path / "logs") as group:
            group.webserver(web_port)
            group.daemon()
            group.wait_for_daemons(web_port, {"SENSOR", "QUEUED_RUN_COORDINATOR"})
            client = DagsterGraphQLClient("127.0.0.1", port_number=web_port)

            # A busy run holds the "hang" tenant; a second run of that tenant queues behind it.
            busy = _cli_start(group, "inventory.sync", "hang")
            worker_pid = group.wait_until(
                "the busy run's worker process",
                lambda: _worker_pid(instance, busy["dagster_run_id"]),
                timeout=60,
            )
            queued = _cli_start(group, "provider_connection.verify", "hang")
            failing = _cli_start(group, "inventory.sync", "down")
            succeeding = _cli_start(group, "inventory.sync", "ok")
            # The Dagster UI's way: no ledger tag, only the partition.
            untagged_run_id = client.submit_job_execution(
                "directory_groups_sync_job",
                repository_location_name=LOCATION_NAME,
                tags={"dagster/partition": "ok"},
            )

            group.wait_until(
                "the failing and succeeding runs to finish",
                lambda: all(
                    instance.get_run_by_id(r["dagster_run_id"]).is_finished
                    for r in (failing, succeeding)
                ),
                timeout=60,
            )
            assert instance.get_run_by_id(queued["dagster_run_id"]).status == (
                DagsterRunStatus.QUEUED
            ), "the per-tenant concurrency limit should hold the second run of 'hang' back"
            client.terminate_run(queued["dagster_run_id"])
            assert instance.get_run_by_id(busy["dagster_run_id"]).status == (
                DagsterRunStatus.STARTED
            )
            os.kill(worker_pid, signal.SIGKILL)

            run_ids = [r["dagster_run_id"] for r in (busy, queued, failing, succeeding)] + [
                untagged_run_id
            ]
            group.wait_until(
                "every Dagster run to end and the ledger to hold no active row",
                lambda: (
                    all(instance.get_run_by_id(i).is_finished for i in run_ids)
                    and ledger.find_by_dagster_run(untagged_run_id) is not None
                    and not ledger.active()
                ),
                timeout=TERMINAL_WAIT,
            )
            rows = ledger.list(limit=100)
            records = {i: instance.get_run_record_by_id(i) for i in run_ids}

            by_run = {r.dagster_run_id: r for r in rows}
            assert len(rows) == len(run_ids) and set(by_run) == set(run_ids), (
                "exactly one row per Dagster run"
            )

            ok = by_run[succeeding["dagster_run_id"]]
            assert (ok.id, ok.outcome, ok.failure_summary) == (succeeding["id"], "succeeded", [])
            assert ok.summary_counts["items"] > 0

            failed = by_run[failing["dagster_run_id"]]
            assert (failed.outcome, _reasons(failed)) == ("failed", {"provider_unavailable"})

            cancelled = by_run[queued["dagster_run_id"]]
            assert (cancelled.outcome, _reasons(cancelled)) == ("cancelled", {"run_cancelled"})

            crashed = by_run[busy["dagster_run_id"]]
            # Contracts that timed out on "hang" before the kill may be listed too.
            assert crashed.outcome == "failed" and "run_crashed" in _reasons(crashed)
            assert instance.get_run_by_id(busy["dagster_run_id"]).status == (
                DagsterRunStatus.FAILURE
            )

            adopted = by_run[untagged_run_id]
            assert TAG_OPERATION_RUN_ID not in records[untagged_run_id].dagster_run.tags
            assert (adopted.type, adopted.trigger_source) == ("directory_groups.sync", "dagster_ui")
            assert adopted.outcome == "succeeded"

            for row in rows:
                record = records[row.dagster_run_id]
                assert row.status == "completed" and row.completed_at is not None, row
                # A job completes its own row as its work ends; the mirror completes the rest
                # with Dagster's times. Either way the row's times lie within the run's.
                assert _within(row.completed_at, record.start_time, record.end_time), row
                if row.started_at is not None:
                    assert _within(row.started_at, record.start_time, record.end_time), row
                    assert row.started_at <= row.completed_at, row
            assert ledger.active() == []
    finally:
        instance.dispose()
        engine.dispose()


def _reasons(row: OperationRun) -> set[str]:
    return {f["reason_code"] for f in row.failure_summary}
