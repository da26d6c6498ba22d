"""The ``atlas-dagster`` command (see README.md "Command line").

Exit codes: 0 succeeded, 1 operation failed, 2 bad usage or config, 3 partially succeeded.
Errors are one line on stderr; ``-v`` adds the trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from atlas_dagster.ledger.run_types import RUN_TYPES, Outcome, Status
from atlas_dagster.reasons import one_line

if TYPE_CHECKING:  # the config (pydantic) and Dagster load only in the commands that need them
    from atlas_dagster.config import AtlasConfig
    from atlas_dagster.ledger.start import StartOutcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_BY_OUTCOME = {
    Outcome.SUCCEEDED: EXIT_OK,
    Outcome.PARTIALLY_SUCCEEDED: EXIT_PARTIAL,
    Outcome.FAILED: EXIT_FAILED,
    Outcome.CANCELLED: EXIT_FAILED,
}


class UsageError(Exception):
    pass


def _config(args: argparse.Namespace) -> AtlasConfig:
    from atlas_dagster.config import load_config

    if getattr(args, "config", None):
        os.environ["ATLAS_CONFIG"] = args.config
    return load_config()


def _read_engine(args: argparse.Namespace):
    """The database for a command that only reads: never migrated or written here."""
    from atlas_dagster.db import read_engine

    return read_engine(_config(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


# --- db ----------------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from atlas_dagster import db

    config = _config(args)
    engine = db.engine_for(config.database_url)
    before = db.current_revision(engine)
    db.upgrade(engine)
    db.sync_config(engine, config)
    print(f"database at revision {db.head_revision()} (was {before or 'empty'})")
    return EXIT_OK


def cmd_db_grant_readonly(args: argparse.Namespace) -> int:
    from atlas_dagster.db import ready_engine
    from atlas_dagster.readonly import grant_readonly

    config = _config(args)
    engine = ready_engine(config)
    if engine.dialect.name != "postgresql":
        raise UsageError("db grant-readonly needs a PostgreSQL database_url")
    grant_readonly(engine, args.role)
    print(f"role {args.role} can read the atlas tables and views, and write nothing")
    return EXIT_OK


# --- start / runs --------------------------------------------------------------------------


def _row_line(row: Any) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in row.summary_counts.items() if not isinstance(v, dict))
    reasons = ", ".join(sorted({f["reason_code"] for f in row.failure_summary}))
    parts = [f"#{row.id}", row.type, f"{row.status}/{row.outcome}"]
    if counts:
        parts.append(counts)
    if reasons:
        parts.append(f"reasons: {reasons}")
    return "  ".join(parts)


def _already_line(row: Any) -> str:
    created = row.created_at.astimezone(UTC)
    today = created.date() == datetime.now(UTC).date()
    when = created.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")
    return f"already {row.status} as #{row.id} ({row.trigger_source}, created {when} UTC)"


def _failure_line(row: Any) -> str | None:
    """The one line a run that did not fully succeed ends with: its first reason and message
    (the trace is in the Dagster event log)."""
    if row.outcome == Outcome.SUCCEEDED or not row.failure_summary:
        return None
    first, more = row.failure_summary[0], len(row.failure_summary) - 1
    level = "warning" if row.outcome == Outcome.PARTIALLY_SUCCEEDED else "error"
    line = f"{level}: {first['reason_code']}: {first['message']}"
    if more:
        line += f" (and {more} more: atlas-dagster runs --id {row.id} --json)"
    return line


def _require_write_access(config: AtlasConfig, run_type: str) -> None:
    """A read-only role may list runs but not start them: say so before anything is written."""
    from atlas_dagster import db

    engine = db.engine_for(config.database_url)
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        # NULL when the table does not exist yet: the upgrade then answers for itself.
        role, writable = conn.exec_driver_sql(
            "SELECT current_user, "
            "has_table_privilege(to_regclass('operation_runs'), 'INSERT, UPDATE')"
        ).one()
    if writable is False:
        raise UsageError(
            f"connected as database role {role!r}, which cannot write operation runs; starting "
            f"{run_type} needs a role with write access (database_url in {config.source})"
        )


def _start_json(outcome: StartOutcome) -> dict[str, Any]:
    return {
        "operation_run": outcome.row.to_dict(),
        "created": outcome.created,
        "dispatched": outcome.dispatched,
    }


def run_start(
    args: argparse.Namespace,
    run_type: str,
    *,
    in_process: bool,
    report: Callable[[StartOutcome], None],
    refuse_existing: bool = False,
    **options: Any,
) -> int:
    """Start ``run_type`` as the command's arguments (and ``options``, which take precedence)
    say; the exit code. With ``refuse_existing``, meeting a row that already holds the
    identity is bad usage (a plan executes once)."""
    # The config first: a broken one is its own line and exit 2, not a failure to load the
    # definitions.
    config = _config(args)
    _require_write_access(config, run_type)

    from atlas_dagster.db import ready_engine
    from atlas_dagster.definitions import defs
    from atlas_dagster.ledger.start import (
        QUIET_LOG_LEVEL,
        VERBOSE_LOG_LEVEL,
        DispatchError,
        StartOutcome,
        start_operation,
        wait_for,
    )
    from atlas_dagster.ledger.store import OperationLedger

    try:
        given = {
            "connection": getattr(args, "connection", None),
            "schedule": getattr(args, "schedule", None),
            "retry_of": getattr(args, "retry_of", None),
            "accept_deletions": getattr(args, "accept_deletions", False),
        }
        outcome = start_operation(
            config,
            run_type,
            defs=defs,
            in_process=in_process,
            console_log_level=VERBOSE_LOG_LEVEL if args.verbose else QUIET_LOG_LEVEL,
            **{**given, **options},
        )
    except DispatchError as exc:
        report(StartOutcome(exc.row, created=True, dispatched=False))
        print(f"error: dispatch failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    as_json, wait = getattr(args, "json", False), getattr(args, "wait", False)
    if not outcome.created and refuse_existing:
        raise UsageError(f"{run_type} is {_already_line(outcome.row)}: nothing was started")
    if not outcome.created and not as_json:
        # Flushed: a caller reading a pipe learns this before a --wait.
        print(_already_line(outcome.row), flush=True)
    if wait and outcome.row.status != Status.COMPLETED:
        outcome = replace(
            outcome,
            row=wait_for(OperationLedger(ready_engine(config)), outcome.row.id, args.timeout),
        )
    if as_json or outcome.created or wait:
        report(outcome)
    row = outcome.row
    if not (wait or (in_process and outcome.created)):
        return EXIT_OK
    if row.status != Status.COMPLETED:
        print(f"error: #{row.id} is still {row.status} after {args.timeout:g} s", file=sys.stderr)
        return EXIT_FAILED
    failure = _failure_line(row)
    if failure:
        print(failure, file=sys.stderr)
    return EXIT_BY_OUTCOME[row.outcome]


def _reporter(args: argparse.Namespace) -> Callable[[StartOutcome], None]:
    if getattr(args, "json", False):
        return lambda outcome: _print_json(_start_json(outcome))
    return lambda outcome: print(_row_line(outcome.row))


def cmd_start(args: argparse.Namespace) -> int:
    return run_start(args, args.type, in_process=args.in_process, report=_reporter(args))


def cmd_runs(args: argparse.Namespace) -> int:
    from atlas_dagster.db import connection_ids
    from atlas_dagster.ledger.store import OperationLedger

    engine = _read_engine(args)
    ledger = OperationLedger(engine)
    ids = connection_ids(engine)
    if args.id is not None:
        row = ledger.get(args.id)
        if row is None:
            raise UsageError(f"no operation run #{args.id}")
        rows = [row]
    else:
        if args.connection and args.connection not in ids:
            raise UsageError(f"no provider connection {args.connection!r} in the database")
        conn_id = ids[args.connection] if args.connection else None
        rows = ledger.list(
            provider_connection_id=conn_id, type=args.type, status=args.status, limit=args.limit
        )
    if args.json:
        if args.id is not None:
            _print_json({"operation_run": rows[0].to_dict()})
        else:
            _print_json({"operation_runs": [r.to_dict() for r in rows]})
        return EXIT_OK
    keys = {v: k for k, v in ids.items()}
    print(
        _table(
            [
                (
                    r.id,
                    keys.get(r.provider_connection_id, ""),
                    r.type,
                    r.status,
                    r.outcome,
                    r.trigger_source,
                    r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    ", ".join(sorted({f["reason_code"] for f in r.failure_summary})),
                )
                for r in rows
            ],
            (
                "id",
                "connection",
                "type",
                "status",
                "outcome",
                "trigger",
                "created (UTC)",
                "reasons",
            ),
        )
    )
    return EXIT_OK


# --- verify / demo ---------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from atlas_dagster.assets.verification import checks_table
    from atlas_dagster.db import ready_engine
    from atlas_dagster.stores.checks import latest_checks

    def report(outcome: StartOutcome) -> None:
        row = outcome.row
        checks = latest_checks(ready_engine(_config(args)), row.provider_connection_id)
        checks = [c for c in checks if c["operation_run_id"] == row.id]
        if args.json:
            _print_json({**_start_json(outcome), "checks": checks})
            return
        if checks:
            print(
                _table(
                    checks_table(checks),
                    ("contract", "policy type", "status", "to grant / reason", "write"),
                )
            )
        print(_row_line(row))

    return run_start(args, "provider_connection.verify", in_process=True, report=report)


def cmd_demo(args: argparse.Namespace) -> int:
    from atlas_dagster.demo import run_demo

    return run_demo(_config(args))


# --- backups -----------------------------------------------------------------------------------


def _backup_store_call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    from atlas_dagster.stores.backups import BackupStoreError

    try:
        return fn(*args, **kw)
    except BackupStoreError as exc:
        raise UsageError(str(exc)) from None


def cmd_backups_list(args: argparse.Namespace) -> int:
    from atlas_dagster.stores.backups import list_sets

    engine = _read_engine(args)
    sets = list_sets(engine, connection=args.connection, schedule=args.schedule, limit=args.limit)
    if args.json:
        _print_json({"backup_sets": [s.to_dict() for s in sets]})
        return EXIT_OK
    print(
        _table(
            [
                (
                    s.id,
                    s.provider_connection,
                    s.backup_schedule,
                    s.status,
                    s.item_count,
                    s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    s.operation_run_id,
                    ", ".join(sorted(s.failed_types)),
                )
                for s in sets
            ],
            ("id", "connection", "schedule", "status", "items", "created (UTC)", "run", "failed"),
        )
    )
    return EXIT_OK


def cmd_backups_diff(args: argparse.Namespace) -> int:
    from atlas_dagster.stores.backup_diff import diff_sets

    diff = _backup_store_call(diff_sets, _read_engine(args), args.a, args.b)
    if args.json:
        _print_json(diff.to_dict())
        return EXIT_OK
    print(f"backup set #{diff.set_a} -> #{diff.set_b}")
    if diff.skipped_types:
        print(f"not compared (not complete in both sets): {', '.join(diff.skipped_types)}")
    for sign, refs in (("+", diff.added), ("-", diff.removed)):
        for ref in refs:
            print(f"{sign} {ref.contract_key}  {ref.display_name}  ({ref.external_id})")
    for change in diff.changed:
        ref = change.policy
        print(f"~ {ref.contract_key}  {ref.display_name}  ({ref.external_id})")
        for f in change.fields:
            values = {
                "added": f"+ {json.dumps(f.after, default=str)}",
                "removed": f"- {json.dumps(f.before, default=str)}",
                "changed": f"{json.dumps(f.before, default=str)} -> "
                f"{json.dumps(f.after, default=str)}",
            }[f.kind]
            print(f"    {f.path}: {values[:200]}")
    print(f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed")
    return EXIT_OK


def cmd_backups_export(args: argparse.Namespace) -> int:
    from atlas_dagster.stores.backup_export import export_set

    result = _backup_store_call(export_set, _read_engine(args), args.set, args.dir)
    print(
        f"backup set #{args.set}: {len(result.files)} files in {result.directory}"
        + (f" ({len(result.removed)} stale files removed)" if result.removed else "")
    )
    return EXIT_OK


# --- simulator -----------------------------------------------------------------------------


# --- restore -----------------------------------------------------------------------------------


def _csv_arg(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _plan_json(engine: Any, plan_id: int) -> dict[str, Any] | None:
    from atlas_dagster.restore import store as plans

    plan = plans.get_plan(engine, plan_id)
    if plan is None:
        return None
    items = [i.to_dict() for i in plans.plan_items(engine, plan_id)]
    for item in items:
        item.pop("planned_view", None)
    return {**plan.to_dict(), "items": items}


def _print_plan(plan: dict[str, Any]) -> None:
    executed = plan["status"] != "planned"
    status = plan["status"]
    if plan["interrupted"]:
        status += (
            f", but its execution (operation run #{plan['execute_operation_run_id']}) ended "
            f"{plan['execution_outcome']} before finishing: make a new plan"
        )
    print(
        f"restore plan #{plan['id']} of backup set #{plan['backup_set_id']} into "
        f"{plan['provider_connection']} (tenant {plan['target_tenant_id']}): {status}, "
        f"expires {plan['expires_at'][:16].replace('T', ' ')} UTC"
    )
    rows = []
    for item in plan["items"]:
        if item["action"] == "unchanged" and not item["message"] and not executed:
            continue
        paths = ", ".join(c["path"] for c in item["changes"][:3])
        if len(item["changes"]) > 3:
            paths += f" (+{len(item['changes']) - 3})"
        rows.append(
            (
                item["position"],
                item["contract_key"],
                (item["display_name"] or "")[:48],
                item["action"],
                item["result"] or "" if executed else len(item["writes"]),
                item["reason_code"] or "",
                item["error"] or item["message"] or paths,
            )
        )
    if rows:
        last = "result" if executed else "writes"
        print(_table(rows, ("#", "type", "name", "action", last, "reason", "changes / note")))
    counts = ", ".join(f"{k}={v}" for k, v in plan["summary_counts"].items())
    print(counts)


def cmd_restore_plan(args: argparse.Namespace) -> int:
    config = _config(args)
    from atlas_dagster.db import ready_engine
    from atlas_dagster.restore.plan import Selection
    from atlas_dagster.stores.backups import SET_COMPLETE, SET_PARTIAL, require_set

    engine = ready_engine(config)
    backup = _backup_store_call(require_set, engine, args.set)
    if backup.status not in (SET_COMPLETE, SET_PARTIAL):
        raise UsageError(f"backup set #{backup.id} is {backup.status}: it cannot be restored")
    connection = args.connection or backup.provider_connection
    selection = Selection(_csv_arg(args.types), _csv_arg(args.items), args.keep_ca_state)
    from graph_contracts import CONTRACTS, POLICY_CONTRACTS, classify

    known = (
        set(POLICY_CONTRACTS)
        | {r.policy_type for k in POLICY_CONTRACTS for r in CONTRACTS[k].type_rules}
        | {classify(CONTRACTS[k], {}).policy_type for k in POLICY_CONTRACTS}
    )
    unknown = [t for t in selection.types if t not in known]
    if unknown:
        raise UsageError(f"unknown policy type {', '.join(unknown)} (a contract key or type)")
    if selection.items:
        from atlas_dagster.stores.backups import set_items

        held = {external_id for _, external_id in set_items(engine, backup.id)}
        absent = [i for i in selection.items if i not in held]
        if absent:
            raise UsageError(f"backup set #{backup.id} holds no object {', '.join(absent)}")

    def report(outcome: StartOutcome) -> None:
        plan_id = outcome.row.context.get("restore_run_id")
        plan = _plan_json(engine, int(plan_id)) if plan_id else None
        if args.json:
            _print_json({**_start_json(outcome), "restore_plan": plan})
            return
        if plan is not None:
            _print_plan(plan)
        print(_row_line(outcome.row))

    return run_start(
        args,
        "restore.plan",
        in_process=args.in_process,
        report=report,
        connection=connection,
        backup_set_id=backup.id,
        target_scope=selection.scope(backup.id),
    )


def cmd_restore_show(args: argparse.Namespace) -> int:
    plan = _plan_json(_read_engine(args), args.plan)
    if plan is None:
        raise UsageError(f"no restore plan #{args.plan}")
    if args.json:
        _print_json({"restore_plan": plan})
    else:
        _print_plan(plan)
    return EXIT_OK


def cmd_restore_execute(args: argparse.Namespace) -> int:
    config = _config(args)
    from atlas_dagster.assets.restore import tenant_of
    from atlas_dagster.db import ready_engine
    from atlas_dagster.restore import store as plans
    from atlas_dagster.restore.execute import PlanRefused, check_executable

    engine = ready_engine(config)
    plan = plans.get_plan(engine, args.plan)
    if plan is None:
        raise UsageError(f"no restore plan #{args.plan}")
    if args.connection and args.connection != plan.provider_connection:
        raise UsageError(
            f"restore plan #{plan.id} restores into {plan.provider_connection!r}, not "
            f"{args.connection!r}: nothing was written"
        )
    if plan.provider_connection not in {c.key for c in config.provider_connections}:
        raise UsageError(f"connection {plan.provider_connection!r} is no longer in the config")
    try:
        check_executable(plan, tenant_of(config, plan.provider_connection), datetime.now(UTC))
    except PlanRefused as exc:
        raise UsageError(f"{exc.message}: nothing was written") from None
    if not args.confirm:
        counts = plan.summary_counts
        raise UsageError(
            f"restore plan #{plan.id} writes to tenant {plan.target_tenant_id} "
            f"({counts.get('create', 0)} to create, {counts.get('update', 0)} to update): "
            "add --confirm to execute it"
        )

    executed: list[StartOutcome] = []

    def report(outcome: StartOutcome) -> None:
        executed.append(outcome)
        if args.json:
            return
        current = _plan_json(engine, plan.id)
        if current is not None and outcome.row.status == Status.COMPLETED:
            _print_plan(current)
        print(_row_line(outcome.row), flush=True)

    code = run_start(
        args,
        "restore.execute",
        in_process=args.in_process,
        report=report,
        refuse_existing=True,
        connection=plan.provider_connection,
        restore_run_id=plan.id,
    )
    # The cache is made true again by a sync of its own (its own ledger row); it queues behind
    # the execution in the tenant's slot.
    follow = argparse.Namespace(**{**vars(args), "json": False, "wait": False})
    synced: list[StartOutcome] = []
    run_start(
        follow,
        "inventory.sync",
        in_process=args.in_process,
        report=synced.append if args.json else lambda o: print(_row_line(o.row)),
        connection=plan.provider_connection,
    )
    if args.json and executed:
        answer = {**_start_json(executed[0]), "restore_plan": _plan_json(engine, plan.id)}
        answer["follow_up"] = _start_json(synced[0]) if synced else None
        _print_json(answer)
    return code


def cmd_simulator_serve(args: argparse.Namespace) -> int:
    from atlas_dagster.simulator import serve_forever

    serve_forever(args.host, args.port, args.profile, args.seed)
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------


def _dispatch_options(parser: argparse.ArgumentParser) -> None:
    """How a command that starts an operation runs it and answers."""
    parser.add_argument("--in-process", action="store_true", help="run the job in this process")
    parser.add_argument("--wait", action="store_true", help="wait until the run completes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to --wait")
    parser.add_argument(
        "--json", action="store_true", help="print the ledger row and what the start did as JSON"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-dagster", description=__doc__)
    parser.add_argument(
        "--config", help="path of atlas.yaml (default: $ATLAS_CONFIG, ./atlas.yaml)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="on a failure, print the full trace too"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dbp = sub.add_parser("db", help="the application database").add_subparsers(
        dest="db_command", required=True
    )
    dbp.add_parser("upgrade", help="migrate the database to head").set_defaults(func=cmd_db_upgrade)
    grant = dbp.add_parser("grant-readonly", help="a PostgreSQL role that reads and writes nothing")
    grant.add_argument("role")
    grant.set_defaults(func=cmd_db_grant_readonly)

    start = sub.add_parser("start", help="start an operation (creates its ledger row first)")
    start.add_argument("type", choices=sorted(RUN_TYPES))
    start.add_argument("--connection", help="provider connection key")
    start.add_argument("--schedule", help="backup schedule key")
    start.add_argument("--retry-of", type=int, help="operation run id to retry")
    start.add_argument(
        "--accept-deletions",
        action="store_true",
        help="inventory.sync: apply the deletions the last mass-deletion hold listed",
    )
    _dispatch_options(start)
    start.set_defaults(func=cmd_start)

    runs = sub.add_parser("runs", help="list operation runs")
    runs.add_argument("--connection")
    runs.add_argument("--type", choices=sorted(RUN_TYPES))
    runs.add_argument("--status", choices=[s.value for s in Status])
    runs.add_argument("--id", type=int, help="show one run")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    verify = sub.add_parser("verify", help="verify a connection's sign-in and permissions")
    verify.add_argument("--connection", required=True)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)

    sub.add_parser(
        "demo", help="every operation against the demo tenant on the embedded default"
    ).set_defaults(func=cmd_demo)

    bk = sub.add_parser("backups", help="backup sets").add_subparsers(
        dest="backups_command", required=True
    )
    bl = bk.add_parser("list", help="list backup sets, newest first")
    bl.add_argument("--connection", help="provider connection key")
    bl.add_argument("--schedule", help="backup schedule key")
    bl.add_argument("--limit", type=int, default=50)
    bl.add_argument("--json", action="store_true")
    bl.set_defaults(func=cmd_backups_list)
    bd = bk.add_parser("diff", help="policies added, removed and changed from set A to set B")
    bd.add_argument("a", type=int)
    bd.add_argument("b", type=int)
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(func=cmd_backups_diff)
    be = bk.add_parser("export", help="write a set as one JSON file per policy")
    be.add_argument("set", type=int)
    be.add_argument("dir")
    be.set_defaults(func=cmd_backups_export)

    rs = sub.add_parser("restore", help="restore a backup set: plan, then execute").add_subparsers(
        dest="restore_command", required=True
    )
    rp = rs.add_parser("plan", help="what a restore would do (writes nothing to the tenant)")
    rp.add_argument("--set", type=int, required=True, help="backup set id")
    rp.add_argument("--connection", help="target connection (default: the set's own)")
    rp.add_argument("--types", help="policy types or contract keys, comma-separated")
    rp.add_argument("--items", help="source object ids, comma-separated")
    rp.add_argument(
        "--keep-ca-state",
        action="store_true",
        help="write conditional access policies enabled as backed up (else report-only)",
    )
    _dispatch_options(rp)
    rp.set_defaults(func=cmd_restore_plan)
    rsh = rs.add_parser("show", help="a plan and, once executed, each item's result")
    rsh.add_argument("plan", type=int)
    rsh.add_argument("--json", action="store_true")
    rsh.set_defaults(func=cmd_restore_show)
    rx = rs.add_parser("execute", help="execute a plan, once (writes to the tenant)")
    rx.add_argument("--plan", type=int, required=True)
    rx.add_argument("--confirm", action="store_true", help="yes, write to the tenant")
    rx.add_argument("--connection", help="refuse unless the plan restores into this connection")
    _dispatch_options(rx)
    rx.set_defaults(func=cmd_restore_execute)

    sim = sub.add_parser("simulator", help="the Microsoft Graph simulator").add_subparsers(
        dest="sim_command", required=True
    )
    serve = sim.add_parser("serve", help="serve the simulator on loopback")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--profile", default="small", choices=("small", "standard", "medium", "large", "xlarge")
    )
    serve.add_argument("--seed", type=int, default=1)
    serve.set_defaults(func=cmd_simulator_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atlas_dagster.config import ConfigError
    from atlas_dagster.db import DatabaseNotReady
    from atlas_dagster.ledger.store import StartError

    try:
        return args.func(args)
    except (ConfigError, UsageError, StartError, DatabaseNotReady) as exc:
        _error(args, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, the trace only with -v
        _error(args, one_line(exc))
        return EXIT_FAILED


def _error(args: argparse.Namespace, line: str) -> None:
    if args.verbose:
        traceback.print_exc()
    print(f"error: {line}", file=sys.stderr)


def run() -> None:
    """The ``atlas-dagster`` console script: ``main``, then out at once. Tearing down an
    interpreter that loaded Dagster takes about half a second, and nothing needs it: every
    database write has committed (SQLite keeps its WAL for the next opener), no thread is left,
    and output and logs are flushed here."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
