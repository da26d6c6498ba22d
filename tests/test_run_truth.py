"""The ledger tells the truth when real processes die or race: a SIGKILLed ``--in-process`` start
frees its identity for the next start, and twelve identical starts released together make one run.

Graph is a simulated tenant served over loopback by this test process, slowed so that runs are
still busy when the test acts; the test waits on ledger rows and request counts, never on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from atlas_dagster import db
from atlas_dagster.config import load_config
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.simulator import GraphSimulator, SimulatedTenant
from atlas_dagster.simulator.server import DEFAULT_SECRET
from tests.dagster_procs import BIN

pytestmark = pytest.mark.slow

KEY = "served"
START = ["start", "inventory.sync", "--connection", KEY, "--in-process", "--json"]


@pytest.fixture
def served() -> Iterator[tuple[GraphSimulator, str]]:
    sim = GraphSimulator(SimulatedTenant.generate("small", 21))
    with sim.serve() as base_url:
        yield sim, base_url


def _setup(tmp_path: Path, database_url: str, sim: GraphSimulator, base_url: str):
    """An atlas.yaml naming the served tenant, the migrated database, and the CLI's env."""
    config = tmp_path / "atlas.yaml"
    config.write_text(
        f"""\
database_url: {database_url}
provider_connections:
  - key: {KEY}
    tenant_id: {sim.tenant.tenant_id}
    client_id: {sim.tenant.client_id}
    client_secret: ${{RUN_TRUTH_SECRET}}
    graph_base_url: {base_url}
    login_base_url: {base_url}
"""
    )
    env = {**os.environ, "RUN_TRUTH_SECRET": DEFAULT_SECRET, "ATLAS_CONFIG": str(config)}
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    db.sync_config(engine, load_config(str(config), env))
    return OperationLedger(engine), env


def _until(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "atlas-dagster"), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_sigkilled_in_process_start_frees_its_identity_for_the_next_start(
    tmp_path, database_url, served
):
    sim, base_url = served
    ledger, env = _setup(tmp_path, database_url, sim, base_url)
    sim.faults.latency_s = 0.3  # slow enough that the run is mid-way when it is killed
    proc = subprocess.Popen(
        [str(BIN / "atlas-dagster"), *START],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        doomed = _until(
            "the start's row to run and its first Graph request",
            lambda: next(
                (r for r in ledger.list() if r.status == "running" and sim.stats.total >= 1), None
            ),
        )
    finally:
        proc.kill()  # SIGKILL, as the OOM killer would
        killed_at = time.time()
        proc.wait()
    sim.faults.latency_s = 0.0

    again = _cli(env, *START)
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    new = answer["operation_run"]
    assert (answer["created"], answer["dispatched"]) == (True, True)
    assert new["id"] != doomed.id and (new["status"], new["outcome"]) == (
        "completed",
        "succeeded",
    )
    old = ledger.get(doomed.id)
    assert (old.status, old.outcome) == ("completed", "failed")
    assert [f["reason_code"] for f in old.failure_summary] == ["run_crashed"]
    assert f"process {proc.pid}" in old.failure_summary[0]["message"]
    freed_after = old.completed_at.timestamp() - killed_at
    print(f"\nSIGKILL of an --in-process start -> identity free: {freed_after:.2f} s")
    assert freed_after < 60
    # Its Dagster run does not stay STARTED either.
    instance = dg.DagsterInstance.get()
    try:
        assert instance.get_run_by_id(doomed.dagster_run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        instance.dispose()


GO_SCRIPT = """\
import pathlib, sys, time
from atlas_dagster import cli, definitions  # every import done before the barrier
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.005)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.postgres
def test_twelve_identical_starts_released_together_make_exactly_one_run(
    tmp_path, postgres_url, served
):
    sim, base_url = served
    _, env = _setup(tmp_path, postgres_url, sim, base_url)
    # The tenant answers nothing until eleven starts have finished: the run of the one that
    # created its row cannot end before the last start has met it, however loaded the machine.
    gate = threading.Event()
    answer = sim.handle
    sim.handle = lambda request: (gate.wait(300), answer(request))[1]
    script = tmp_path / "go.py"
    script.write_text(GO_SCRIPT)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(12)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(go), *START],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        _until("all twelve starts at the barrier", lambda: all(r.exists() for r in ready), 240)
        go.touch()
        _until("eleven starts to end", lambda: sum(p.poll() is not None for p in procs) >= 11, 240)
        gate.set()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert [p.returncode for p in procs] == [0] * 12, [err for _, err in outputs]
    answers = [json.loads(out) for out, _ in outputs]
    created = [a for a in answers if a["created"]]
    assert len(created) == 1
    assert sum(not a["created"] and not a["dispatched"] for a in answers) == 11
    assert {a["operation_run"]["id"] for a in answers} == {created[0]["operation_run"]["id"]}
    assert created[0]["operation_run"]["outcome"] == "succeeded"
