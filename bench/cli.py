"""Benchmark: issue #14's end-to-end goals, as ``atlas-dagster`` commands (Python start-up, imports
and Dagster's run machinery included), against a simulated ``standard`` tenant (509 policies)
served over loopback from this process.

For each Graph condition — 30 ms per response, 150 ms per response, and a 429 storm (every 50th
request or sub-request throttled with ``Retry-After: 0.2``, at 30 ms) — a fresh database and
Dagster home, a warm-up command (an in-process verify, which also creates Dagster's storage), then
timed: ``start backup_schedule.run_now --in-process`` and ``start inventory.sync --in-process``.
Then, timed too, the commands that only read: ``--help``, ``runs`` and ``backups list``.

Prints, as JSON, each command's wall time, request units and throttled retries, and how fast
this machine starts Python and imports Dagster (the fixed cost of every command). Goals (exit 1
and a FAILED line when missed): backup and inventory ≤ 2.5 s at 30 ms, ≤ 4 s at 150 ms, ≤ 3 s in
the storm; request units at the tenant's minimum (without throttling); the reading commands
≤ 0.4 s (best of five, so one scheduling hiccup of a shared machine does not decide it).

    python bench/cli.py [--database-url postgresql://...] [-v]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from served import machine, report, served

CONDITIONS = {
    "30ms": {"latency_ms": 30, "throttle_every": None, "goal_s": 2.5},
    "150ms": {"latency_ms": 150, "throttle_every": None, "goal_s": 4.0},
    "429_storm": {"latency_ms": 30, "throttle_every": 50, "goal_s": 3.0},
}
READ_GOAL_S = 0.4
TRIES = 5


def _condition(name: str, database_url: str | None, workdir: Path, verbose: bool) -> dict:
    from atlas_dagster.simulator import GraphSimulator, SimulatedTenant, minimum_request_units
    from graph_contracts import POLICY_CONTRACTS

    spec = CONDITIONS[name]
    sim = GraphSimulator(SimulatedTenant.generate("standard", 1))
    url = database_url or f"sqlite:///{workdir / 'atlas.db'}"
    out: dict = {"condition": name, **spec}
    with served(sim, url, workdir, verbose) as cli:
        cli.run(
            "start", "provider_connection.verify", "--connection", "bench", "--in-process",
            answers=False,
        )  # fmt: skip
        sim.faults.latency_s = spec["latency_ms"] / 1000
        sim.faults.throttle_every = spec["throttle_every"]
        for label, argv in (
            ("backup", ("start", "backup_schedule.run_now", "--schedule", "bench-nightly")),
            ("inventory", ("start", "inventory.sync", "--connection", "bench")),
        ):
            answer, wall, _ = cli.run(*argv, "--in-process", "--json")
            counts = answer["operation_run"]["summary_counts"]
            out[label] = {
                "wall_s": round(wall, 2),
                "outcome": answer["operation_run"]["outcome"],
                "request_units": counts.get("graph_request_units"),
                "throttled_retries": counts.get("graph_throttled_retries"),
            }
        sim.faults.latency_s, sim.faults.throttle_every = 0.0, None
        out["minimum_units"] = minimum_request_units(sim.tenant, POLICY_CONTRACTS)
        if name == "30ms":
            for label, argv in (
                ("help", ("--help",)),
                ("runs", ("runs",)),
                ("backups_list", ("backups", "list")),
            ):
                times = [cli.run(*argv, answers=False)[1] for _ in range(TRIES)]
                out[label] = {"best_s": round(min(times), 2), "all_s": [round(t, 2) for t in times]}
    return out


def problems(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for label in ("backup", "inventory"):
            run = r[label]
            if run["outcome"] != "succeeded":
                out.append(f"{r['condition']} {label}: {run['outcome']}")
            if run["wall_s"] > r["goal_s"]:
                out.append(
                    f"{r['condition']} {label} took {run['wall_s']} s (goal {r['goal_s']} s)"
                )
            # Without throttling, a read is the tenant's minimum; a storm's retries (a throttled
            # $batch resends its sub-requests) come on top.
            if r["throttle_every"] is None and run["request_units"] != r["minimum_units"]:
                out.append(
                    f"{r['condition']} {label}: {run['request_units']} request units, not the "
                    f"minimum {r['minimum_units']}"
                )
        for label in ("help", "runs", "backups_list"):
            if label in r and r[label]["best_s"] > READ_GOAL_S:
                out.append(f"{label} took {r[label]['best_s']} s (goal {READ_GOAL_S} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", help="default: a fresh SQLite file per condition")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    results = []
    for name in args.conditions.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(_condition(name, args.database_url, Path(tmp), args.verbose))
    report({"machine": machine(), "conditions": results}, problems(results))


if __name__ == "__main__":
    main()
