"""Benchmark: a backup of a simulated tenant, then an unchanged second backup.

Prints, as JSON: items, payloads and bytes stored, wall time, throttled retries, and the request
units of the first backup against the minimum (list pages plus the per-item reads Graph cannot
return inline; target: at most 5 % over — the script exits 1 when it is over). A request unit
is a request or a ``$batch`` sub-request. The second backup must store no new payload.

    python bench/backup.py [--profile large] [--latency-ms 30] [--throttle-every 50]
                           [--database-url postgresql://...]

``--latency-ms`` delays every simulated Graph response (sign-in excepted), as a tenant across the
network would; ``--throttle-every N`` answers every Nth request or sub-request 429 with
``Retry-After: 0.2`` (a throttling storm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

MAX_OVERHEAD_PCT = 5.0


def _backup(engine, client, schedule) -> tuple[dict, float]:
    from atlas_dagster.assets.backups import plan_backup, run_backup
    from atlas_dagster.stores import backups as store

    plan = plan_backup(schedule)
    set_id = store.create_set(
        engine,
        provider_connection_id=schedule.provider_connection_id,
        backup_schedule_id=schedule.id,
        policy_types=plan.policy_types,
    )
    started = time.perf_counter()
    summary = run_backup(engine, client, plan, set_id, None)
    wall = time.perf_counter() - started
    return {"status": summary.status, **summary.counts()}, wall


def _shared_names(engine, set_id: int) -> dict:
    """Policies whose (type, display name) another policy of the set shares: all are kept."""
    from atlas_dagster.stores import backups as store

    names: dict[tuple[str, str | None], int] = {}
    for item in store.set_items(engine, set_id).values():
        key = (item.contract_key, item.display_name)
        names[key] = names.get(key, 0) + 1
    return {
        "names_shared": sum(1 for n in names.values() if n > 1),
        "policies_sharing_a_name": sum(n for n in names.values() if n > 1),
    }


def run(
    profile: str, database_url: str, latency_ms: float = 0.0, throttle_every: int | None = None
) -> dict:
    from atlas_dagster.config import parse_config
    from atlas_dagster.db import ready_engine
    from atlas_dagster.resources.graph import client_for
    from atlas_dagster.simulator import (
        GraphSimulator,
        SimulatedTenant,
        install_simulator,
        minimum_request_units,
    )
    from atlas_dagster.stores import backups as store
    from graph_contracts import POLICY_CONTRACTS

    config = parse_config(
        f"database_url: {database_url}\nprovider_connections:\n"
        f"  - key: bench\n    simulated: {{profile: {profile}, seed: 1}}\n"
        "backup_schedules:\n  - key: bench-nightly\n    provider_connection: bench\n"
        '    cron: "0 2 * * *"\n',
        "bench",
        {},
    )
    engine = ready_engine(config)
    sim = GraphSimulator(SimulatedTenant.generate(profile, 1))
    install_simulator("bench", sim)
    client = client_for(config.connection("bench"))
    client.token_claims()  # sign in outside the measurement
    sim.faults.latency_s = latency_ms / 1000
    sim.faults.throttle_every = throttle_every
    schedule = store.find_schedule(engine, key="bench-nightly")
    assert schedule is not None
    first, first_wall = _backup(engine, client, schedule)
    second, second_wall = _backup(engine, client, schedule)
    minimum = minimum_request_units(sim.tenant, POLICY_CONTRACTS)
    units = first["graph_request_units"]
    [newest] = store.list_sets(engine, limit=1)
    return {
        "profile": profile,
        "backend": engine.dialect.name,
        "latency_ms": latency_ms,
        "throttle_every": throttle_every,
        "first": {**first, "wall_s": round(first_wall, 2)},
        "second_unchanged": {**second, "wall_s": round(second_wall, 2)},
        "request_units": units,
        "minimum_units": minimum,
        "overhead_pct": round(100 * (units - minimum) / minimum, 2),
        **_shared_names(engine, newest.id),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="large")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="per simulated response")
    parser.add_argument("--throttle-every", type=int, help="answer every Nth request 429")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        result = run(args.profile, url, args.latency_ms, args.throttle_every)
    print(json.dumps(result, indent=2))
    problems = []
    if result["overhead_pct"] > MAX_OVERHEAD_PCT:
        problems.append(f"request units {result['overhead_pct']}% over the minimum")
    if result["second_unchanged"]["new_payloads"] != 0:
        problems.append("the unchanged second backup stored new payloads")
    if result["first"]["status"] != "complete":
        problems.append(f"the backup is {result['first']['status']}")
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
