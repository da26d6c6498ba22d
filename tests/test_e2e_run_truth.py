"""End to end on a real ``dagster-daemon`` + ``dagster-webserver`` with PostgreSQL storage: a run
worker killed with SIGKILL stops its work and writes nothing after its ledger row completed, the
tenant's next run waits until it has, and ``--in-process`` starts of one tenant never take away
another tenant's partition while the daemon runs that tenant.

Connections: ``slow`` is a simulated tenant served over loopback by this test, slowed, and held
mid-sync (it stops answering once the sync has written rows) until its worker has been killed; ``a`` and ``b`` are small in-process simulated tenants.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import db, schema
from atlas_dagster.config import load_config
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.simulator import GraphSimulator, SimulatedTenant
from atlas_dagster.simulator.server import DEFAULT_SECRET
from tests.dagster_procs import dagster_processes, free_port, process_env, write_instance
from tests.test_e2e_daemon import _cli_start, _reasons, _worker_pid

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning"),
]

IN_PROCESS_STARTS = 20


def _config(path: Path, database_url: str, web_port: int, sim: GraphSimulator, url: str) -> Path:
    path.write_text(
        f"""\
database_url: {database_url}
dagster_webserver_url: http://127.0.0.1:{web_port}
provider_connections:
  - key: slow
    tenant_id: {sim.tenant.tenant_id}
    client_id: {sim.tenant.client_id}
    client_secret: ${{E2E_SLOW_SECRET}}
    graph_base_url: {url}
    login_base_url: {url}
  - key: a
    simulated: {{profile: small, seed: 41}}
  - key: b
    simulated: {{profile: small, seed: 42}}
"""
    )
    return path


def _latest_write(engine: sa.Engine, conn_id: int):
    items = schema.inventory_items
    with engine.connect() as conn:
        return conn.execute(
            sa.select(
                sa.func.max(sa.func.greatest(items.c.first_seen_at, items.c.last_seen_at))
            ).where(items.c.provider_connection_id == conn_id)
        ).scalar_one()


def test_a_killed_worker_writes_nothing_more_and_in_process_starts_keep_other_partitions(
    tmp_path: Path,
    pg_pair: tuple[str, str],
    monkeypatch,
) -> None:
    app_url, dagster_url = pg_pair
    home = Path(os.environ["DAGSTER_HOME"])
    write_instance(home, dagster_url)
    sim = GraphSimulator(SimulatedTenant.generate("small", 31))
    sim.faults.latency_s = 0.5
    # Once the sync has written its first rows the tenant stops answering until the test lets
    # it: the run is mid-sync when its worker is killed, however fast reads have become.
    passing = threading.Event()
    passing.set()
    answer = sim.handle
    sim.handle = lambda request: (passing.wait(300), answer(request))[1]
    monkeypatch.setenv("E2E_SLOW_SECRET", DEFAULT_SECRET)
    engine = sa.create_engine(db.sqlalchemy_url(app_url))
    ledger = OperationLedger(engine)
    instance = dg.DagsterInstance.get()
    partitions = provider_connection_partitions.name
    try:
        with (
            sim.serve() as sim_url,
            dagster_processes(
                process_env(
                    home,
                    _config(
                        tmp_path / "atlas.yaml", app_url, web_port := free_port(), sim, sim_url
                    ),
                    E2E_SLOW_SECRET=DEFAULT_SECRET,
                ),
                tmp_path,
                tmp_path / "logs",
            ) as group,
        ):
            config = load_config(str(tmp_path / "atlas.yaml"))
            group.webserver(web_port)
            group.daemon()
            group.wait_for_daemons(web_port, {"SENSOR", "QUEUED_RUN_COORDINATOR"})
            group.wait_until(
                "the partitions sensor to add every connection",
                lambda: {"slow", "a", "b"} <= set(instance.get_dynamic_partitions(partitions)),
                timeout=90,
            )
            db.upgrade(engine)
            db.sync_config(engine, config)
            slow_id = db.connection_ids(engine)["slow"]

            # --- A worker killed mid-sync ---------------------------------------------------
            busy = _cli_start(group, "inventory.sync", "slow")
            worker = group.wait_until(
                "the busy run's worker",
                lambda: _worker_pid(instance, busy["dagster_run_id"]),
                timeout=90,
            )

            def mid_sync() -> bool:
                if ledger.get(busy["id"]).status != "running":
                    return False
                if _latest_write(engine, slow_id) is None:
                    return False
                passing.clear()
                return True

            group.wait_until(
                "the busy run to hold the tenant and write inventory rows",
                mid_sync,
                timeout=120,
                interval=0.05,
            )
            follower = _cli_start(group, "provider_connection.verify", "slow")
            os.kill(worker, signal.SIGKILL)
            killed_at = time.time()
            crashed = group.wait_until(
                "the killed run's row to complete",
                lambda: (r := ledger.get(busy["id"])).status == "completed" and r,
                timeout=60,
                interval=0.1,
            )
            freed_after = crashed.completed_at.timestamp() - killed_at
            print(
                f"\nSIGKILL of a daemon run worker -> row failed, tenant free: {freed_after:.2f} s"
            )
            assert crashed.outcome == "failed" and "run_crashed" in _reasons(crashed)
            assert freed_after <= 30
            passing.set()  # the tenant answers again: its next run may read

            # --- In-process starts of "a" while the daemon runs "b" -------------------------
            missing: list[float] = []
            polling = threading.Event()

            def poll() -> None:
                while not polling.is_set():
                    if "b" not in instance.get_dynamic_partitions(partitions):
                        missing.append(time.time())
                    polling.wait(0.02)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            defs = build_definitions(config)
            b_rows = []
            a_rows = []
            for i in range(IN_PROCESS_STARTS):
                if i % 4 == 0:
                    run_type = "directory_groups.sync" if i % 8 else "inventory.sync"
                    b_rows.append(_cli_start(group, run_type, "b", new=False))
                a_rows.append(
                    start_operation(
                        config, "directory_groups.sync", defs=defs, connection="a", in_process=True
                    ).row
                )
            group.wait_until(
                "b's daemon runs and the follower to complete",
                lambda: all(ledger.get(r["id"]).status == "completed" for r in [*b_rows, follower]),
                timeout=180,
            )
            polling.set()
            poller.join(5)
            assert missing == [], "an --in-process start removed another tenant's partition"
            assert [r.outcome for r in a_rows] == ["succeeded"] * IN_PROCESS_STARTS
            assert {ledger.get(r["id"]).outcome for r in b_rows} == {"succeeded"}

            # The tenant's next run began only once the killed run's row had completed, and
            # nothing of the killed work reached the cache or its row after that.
            after = ledger.get(follower["id"])
            assert after.outcome == "succeeded" and after.started_at >= crashed.completed_at
            last = _latest_write(engine, slow_id)
            assert last is not None and last <= crashed.completed_at
            final = ledger.get(busy["id"])
            assert (final.updated_at, final.summary_counts) == (
                crashed.updated_at,
                crashed.summary_counts,
            )
            assert instance.get_run_by_id(busy["dagster_run_id"]).status == (
                dg.DagsterRunStatus.FAILURE
            )
    finally:
        instance.dispose()
        engine.dispose()
