"""Benchmark: the GraphClient against the in-process simulator.

Prints:
- pages/s and items/s streaming every policy contract of a tenant (with details and assignments);
- peak RSS while streaming the xlarge groups collection through delta (target: < 300 MB);
- request units of a full tenant read against the minimum (target: at most 5 % over). A request
  unit is a request or a ``$batch`` sub-request; the minimum is the list pages plus the per-item
  reads Graph cannot return inline.

    python bench/graph_client.py [--profile large] [--groups-profile xlarge]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _client(profile: str):
    from atlas_dagster.config import parse_config
    from atlas_dagster.resources.graph import client_for
    from atlas_dagster.simulator import GraphSimulator, SimulatedTenant, install_simulator

    sim = GraphSimulator(SimulatedTenant.generate(profile, 1))
    install_simulator("bench", sim)
    config = parse_config(
        f"provider_connections:\n  - key: bench\n    simulated: {{profile: {profile}, seed: 1}}\n",
        "bench",
        {},
    )
    return sim, client_for(config.connection("bench"))


def full_read(profile: str) -> dict:
    from graph_contracts import POLICY_CONTRACTS

    sim, client = _client(profile)
    client.token_claims()
    before = client.stats.as_dict()
    started = time.perf_counter()
    items = 0
    for key in POLICY_CONTRACTS:
        for _ in client.read_policies(key):
            items += 1
    wall = time.perf_counter() - started
    counted = client.stats.since(before)
    units, pages = counted["request_units"], counted["pages"]
    from atlas_dagster.simulator import minimum_request_units

    minimum = minimum_request_units(sim.tenant, POLICY_CONTRACTS)
    return {
        "profile": profile,
        "items": items,
        "wall_s": round(wall, 2),
        "pages_per_s": round(pages / wall),
        "items_per_s": round(items / wall),
        "http_requests": counted["requests"],
        "request_units": units,
        "minimum_units": minimum,
        "overhead_pct": round(100 * (units - minimum) / minimum, 2),
    }


def stream_groups(profile: str) -> dict:
    _sim, client = _client(profile)
    started = time.perf_counter()
    groups = pages = 0
    for page in client.delta("groups_delta", None):
        pages += 1
        groups += len(page.items)
    wall = time.perf_counter() - started
    return {
        "profile": profile,
        "groups": groups,
        "pages": pages,
        "wall_s": round(wall, 2),
        "items_per_s": round(groups / wall),
        "pages_per_s": round(pages / wall),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="large")
    parser.add_argument("--groups-profile", default="xlarge")
    parser.add_argument("--child", choices=("read", "groups"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "read":
        print(json.dumps(full_read(args.profile)))
        return
    if args.child == "groups":
        print(json.dumps(stream_groups(args.groups_profile)))
        return
    # Each measurement in its own process: peak RSS is then the streaming's alone.
    for child in ("read", "groups"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                child,
                "--profile",
                args.profile,
                "--groups-profile",
                args.groups_profile,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{child}: FAILED\n{done.stderr[-3000:]}")
            sys.exit(1)
        print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
