"""``atlas-dagster demo``: every operation against the simulated demo tenant, then a summary."""

from __future__ import annotations

import sys
import time
from typing import Any

import sqlalchemy as sa

from atlas_dagster import schema
from atlas_dagster.config import AtlasConfig
from atlas_dagster.db import ready_engine
from atlas_dagster.ledger.run_types import Outcome
from atlas_dagster.ledger.start import ensure_dagster_home, job_names, start_operation
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.restore.plan import Selection

SUMMARY_TABLES = (
    "provider_connections",
    "inventory_items",
    "inventory_assignments",
    "directory_groups",
    "provider_connection_checks",
    "backup_sets",
    "backup_items",
    "backup_payloads",
    "restore_plans",
    "restore_items",
    "operation_runs",
)


def _steps(config: AtlasConfig) -> list[tuple[str, str, dict[str, Any]]]:
    steps: list[tuple[str, str, dict[str, Any]]] = []
    for conn in config.provider_connections:
        steps += [
            (f"verify {conn.key}", "provider_connection.verify", {"connection": conn.key}),
            (f"sync groups of {conn.key}", "directory_groups.sync", {"connection": conn.key}),
            (f"sync inventory of {conn.key}", "inventory.sync", {"connection": conn.key}),
        ]
    for sched in config.backup_schedules:
        steps += [
            (f"back up now ({sched.key})", "backup_schedule.run_now", {"schedule": sched.key}),
            # What restoring that backup would do now: a plan reads, it writes nothing.
            (
                f"plan a restore of that backup ({sched.key})",
                "restore.plan",
                {"connection": sched.provider_connection, "plan_of": sched.key},
            ),
        ]
    return steps


def run_demo(config: AtlasConfig, out=sys.stdout) -> int:
    from atlas_dagster.definitions import defs

    home = ensure_dagster_home()
    engine = ready_engine(config)
    available = job_names(defs)
    from atlas_dagster.ledger.run_types import RUN_TYPES

    steps = [s for s in _steps(config) if RUN_TYPES[s[1]].job_name in available]
    print(
        f"atlas-dagster demo: {config.source}, database {engine.url.render_as_string()}", file=out
    )
    print(f"Dagster instance: {home}", file=out)
    worst = 0
    sets: dict[str, int] = {}
    plan_id: int | None = None
    for n, (label, run_type, kwargs) in enumerate(steps, 1):
        print(f"[{n}/{len(steps)}] {label} …", end="", flush=True, file=out)
        started = time.monotonic()
        if "plan_of" in kwargs:
            backup_set = sets.get(kwargs.pop("plan_of"))
            if backup_set is None:
                print(" skipped (the backup made no set)", file=out)
                continue
            kwargs.update(backup_set_id=backup_set, target_scope=Selection().scope(backup_set))
        outcome = start_operation(
            config, run_type, defs=defs, in_process=True, trigger_source="demo", **kwargs
        )
        row = outcome.row
        reasons = ", ".join(sorted({f["reason_code"] for f in row.failure_summary}))
        print(
            f" {row.outcome} in {time.monotonic() - started:.1f}s (operation run #{row.id})"
            + (f" — {reasons}" if reasons else ""),
            file=out,
        )
        if row.outcome in (Outcome.FAILED, Outcome.CANCELLED):
            worst = 1
        if run_type == "backup_schedule.run_now" and row.context.get("backup_schedule_run_id"):
            sets[kwargs["schedule"]] = int(row.context["backup_schedule_run_id"])
        if run_type == "restore.plan" and row.context.get("restore_run_id"):
            plan_id = int(row.context["restore_run_id"])
    _summary(engine, out, plan_id)
    return worst


def _summary(engine: sa.Engine, out, plan_id: int | None) -> None:
    print("\nRows per table:", file=out)
    with engine.connect() as conn:
        for name in SUMMARY_TABLES:
            table = schema.metadata.tables[name]
            count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            print(f"  {name:<28} {count:>8}", file=out)
    print("\nLedger (latest first):", file=out)
    for row in OperationLedger(engine).list(limit=10):
        counts = ", ".join(
            f"{k}={v}" for k, v in row.summary_counts.items() if isinstance(v, int) and v
        )
        print(f"  #{row.id:<4} {row.type:<28} {row.status}/{row.outcome:<20} {counts}", file=out)
    ui = "DAGSTER_HOME=$PWD/.atlas/dagster .venv/bin/dagster dev -w workspace.yaml"
    analytics = (
        ".venv/bin/python -c 'from atlas_dagster import analytics; print(analytics.assignments())'"
    )
    nexts = [
        (".venv/bin/atlas-dagster runs", "the ledger (add --json for machines)"),
        (".venv/bin/atlas-dagster backups list", "backup sets; backups diff A B; backups export"),
        *(
            [(f".venv/bin/atlas-dagster restore show {plan_id}", "what restoring would do")]
            if plan_id is not None
            else []
        ),
        (ui, "these runs, assets, checks and metadata in the UI"),
        (analytics, "the cached tables as pandas DataFrames"),
    ]
    print("\nWhere to look next:", file=out)
    for command, what in nexts:
        # A long command gets its explanation on the next line, aligned with the others.
        gap = f"\n{'':<43}" if len(command) > 39 else " " * (41 - len(command))
        print(f"  {command}{gap}{what}", file=out)
