"""Benchmark: full and no-change incremental syncs of simulated tenants into SQLite and PostgreSQL.

Prints, per profile and backend: wall time, rows/s, Graph requests, request units, throttled
retries and peak RSS, for the groups sync (delta) and the inventory sync. Each scenario runs in its
own process, so peak RSS is that scenario's alone; the simulator serves it from another process
over loopback HTTP, as Graph would from across the network, so its work is not counted as ours.
``--latency-ms`` delays each of its responses, as a tenant across the network would;
``--throttle-every N`` answers every Nth request or sub-request 429 with ``Retry-After: 0.2``.

    python bench/sync.py                                  # small, large, xlarge on both backends
    python bench/sync.py --profiles xlarge --backends postgres --only groups
    python bench/sync.py --profiles standard --only inventory --latency-ms 30 --throttle-every 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid

PG_ADMIN = os.environ.get(
    "ATLAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scenario(profile: str, database_url: str, only: str, served: str) -> dict:
    """Runs in a child process: full sync, then a no-change incremental sync."""
    from atlas_dagster import db
    from atlas_dagster.assets.common import graph_counts
    from atlas_dagster.assets.directory_groups import run_groups_sync
    from atlas_dagster.assets.inventory import run_inventory_sync
    from atlas_dagster.config import parse_config
    from atlas_dagster.db import ready_engine
    from atlas_dagster.resources.graph import client_for

    base_url, tenant_id, client_id = served.split(",")
    config = parse_config(
        f"database_url: {database_url}\nmass_deletion_threshold: 1.0\nprovider_connections:\n"
        f"  - key: bench\n    tenant_id: {tenant_id}\n    client_id: {client_id}\n"
        f"    client_secret: simulated-secret\n    graph_base_url: {base_url}\n"
        f"    login_base_url: {base_url}\n",
        "bench",
        {},
    )
    engine = ready_engine(config)
    client = client_for(config.connection("bench"))
    client.token_claims()  # sign in outside the measurement
    conn_id = db.connection_ids(engine)["bench"]
    out: dict = {"profile": profile, "backend": engine.dialect.name}
    for phase in ("full", "incremental"):
        if only in ("all", "groups"):
            before, started = client.stats.as_dict(), time.perf_counter()
            result = run_groups_sync(engine, client, conn_id)
            wall = time.perf_counter() - started
            out[f"groups_{phase}"] = {
                "rows": result.upserted,
                "wall_s": round(wall, 2),
                "rows_per_s": round(result.upserted / wall) if wall and result.upserted else 0,
                **graph_counts(client.stats.since(before)),
            }
        if only in ("all", "inventory"):
            before, started = client.stats.as_dict(), time.perf_counter()
            summary = run_inventory_sync(engine, client, conn_id, None)
            wall = time.perf_counter() - started
            items = summary.totals()["items"]
            out[f"inventory_{phase}"] = {
                "items": items,
                "written": summary.totals()["created"] + summary.totals()["updated"],
                "wall_s": round(wall, 2),
                "items_per_s": round(items / wall) if wall else 0,
                **graph_counts(client.stats.since(before)),
            }
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    engine.dispose()
    return out


def _pg_database() -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"atlas_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(
        PG_ADMIN.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return name, PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def _drop(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(
        PG_ADMIN.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default="small,large,xlarge")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--only", default="all", choices=("all", "groups", "inventory"))
    parser.add_argument("--latency-ms", type=float, default=0.0, help="per simulated response")
    parser.add_argument("--throttle-every", type=int, help="answer every Nth request 429")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scenario(*args.child[:2], args.only, args.child[2])))
        return
    if args.serve:
        serve(args.serve, args.latency_ms, args.throttle_every)
        return
    for profile in args.profiles.split(","):
        with _simulator(profile, args.latency_ms, args.throttle_every) as served:
            _profile(profile, served, args)


def serve(profile: str, latency_ms: float, throttle_every: int | None) -> None:
    """Runs in a child process: the simulated tenant on a free loopback port, each response
    ``latency_ms`` late, every ``throttle_every``th request throttled. Prints "url,tenant,client"
    once it listens; serves until stdin closes, so it ends with the benchmark however that ends."""
    from atlas_dagster.simulator import GraphSimulator, SimulatedTenant

    sim = GraphSimulator(SimulatedTenant.generate(profile, 1))
    sim.faults.latency_s = latency_ms / 1000
    sim.faults.throttle_every = throttle_every
    with sim.serve() as base_url:
        print(f"{base_url},{sim.tenant.tenant_id},{sim.tenant.client_id}", flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def _simulator(profile: str, latency_ms: float, throttle_every: int | None):
    """The `serve` child for ``profile``; yields "url,tenant,client"."""
    throttle = ["--throttle-every", str(throttle_every)] if throttle_every else []
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", profile, "--latency-ms", str(latency_ms), *throttle],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if line.count(",") != 2:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield line
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=10)


def _profile(profile: str, served: str, args: argparse.Namespace) -> None:
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            pg_name = None
            if backend == "postgres":
                pg_name, url = _pg_database()
            else:
                url = f"sqlite:///{tmp}/bench.db"
            try:
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--only",
                        args.only,
                        "--child",
                        profile,
                        url,
                        served,
                    ],
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                )
            finally:
                if pg_name:
                    _drop(pg_name)
        if done.returncode != 0:
            print(f"{profile}/{backend}: FAILED\n{done.stderr[-2000:]}")
            continue
        print(json.dumps(json.loads(done.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
