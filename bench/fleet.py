"""Benchmark: a fleet of simulated tenants through a real ``dagster-webserver`` and
``dagster-daemon`` on PostgreSQL storage with the shipped instance config (``deploy/dagster.yaml``:
the queued run coordinator, at most one run per tenant).

For each tenant it starts, as ``atlas-dagster start`` does (the ledger row, then a submission to
the webserver), a verification, a groups refresh, an inventory sync and a backup, then waits until
the ledger has completed every row. Prints, as JSON and as a table: runs per minute, submit →
completed percentiles, outcomes, peak RSS of the daemon and of a run worker, the CPU the Dagster
processes spent, Graph request units per tenant, and whether the ledger converged (no active row,
exactly one row per Dagster run). Exits 1 when it did not, or when the fleet overran its budget.

    python bench/fleet.py [--tenants 50] [--budget-s 840] [--run-types T,…]

Two fresh databases (the app's and Dagster's) are created on the server at
``$ATLAS_BENCH_POSTGRES_URL`` and dropped at the end; every process started here is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get(
    "ATLAS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Each tenant's night: what an MSP runs for every tenant it looks after.
RUN_TYPES = (
    "provider_connection.verify",
    "directory_groups.sync",
    "inventory.sync",
    "backup_schedule.run_now",
)
SAMPLE_S = 0.5
LOG_TAIL_CHARS = 4000

WORKSPACE_QUERY = """query { workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
DAEMONS_QUERY = "query { instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"
NEEDED_DAEMONS = {"SENSOR", "QUEUED_RUN_COORDINATOR"}


class BenchError(Exception):
    """The fleet could not be brought up or measured; the message says why."""


class OutOfTime(BenchError):
    """The bench's time budget ran out."""


class NotReady(Exception):
    """The webserver answered, but not yet with what we wait for."""


def profile_of(index: int) -> str:
    """Mostly small tenants; every fifth one medium."""
    return "medium" if index % 5 == 0 else "small"


def atlas_yaml(tenants: int, database_url: str, web_port: int) -> str:
    lines = [
        f"database_url: {database_url}",
        f"dagster_webserver_url: http://127.0.0.1:{web_port}",
        "provider_connections:",
    ]
    for i in range(1, tenants + 1):
        lines.append(f"  - {{key: t{i:04d}, simulated: {{profile: {profile_of(i)}, seed: {i}}}}}")
    # Disabled: the bench starts each backup itself (run_now), no tick may add runs.
    lines.append("backup_schedules:")
    for i in range(1, tenants + 1):
        lines.append(
            f'  - {{key: t{i:04d}-nightly, provider_connection: t{i:04d}, cron: "0 2 * * *", '
            "enabled: false}"
        )
    return "\n".join(lines) + "\n"


@contextmanager
def fresh_databases(*roles: str) -> Iterator[dict[str, str]]:
    """A new, empty database on the bench server per role; all dropped however the block ends
    (sessions still open in them are ended first)."""
    admin_url = sa.make_url(PG_ADMIN).set(drivername="postgresql+psycopg2")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    stem = f"atlas_fleet_{uuid.uuid4().hex[:8]}"
    names = {role: f"{stem}_{role}" for role in roles}
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield {
            role: sa.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
            for role, name in names.items()
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- The Dagster processes ---------------------------------------------------------------------


@dataclass
class Processes:
    """The webserver and the daemon, each in its own session: the code servers and run workers
    they spawn share its process group, which ``stop`` kills."""

    env: dict[str, str]
    log_dir: Path
    popens: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            self.popens[name] = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, popen in self.popens.items():
            if popen.poll() is not None:
                raise BenchError(f"{name} exited with code {popen.returncode}")

    def log_tails(self) -> str:
        return "".join(
            f"\n===== {name} =====\n"
            f"{(self.log_dir / f'{name}.log').read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
            for name in self.popens
        )

    def tree(self, name: str) -> list[psutil.Process]:
        """The process and every descendant it has now."""
        try:
            root = psutil.Process(self.popens[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left of it, including descendants
        that moved to a session of their own."""
        trees = {name: self.tree(name) for name in self.popens}
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for name, popen in self.popens.items():
                with suppress(ProcessLookupError):
                    os.killpg(popen.pid, sig)
                for proc in trees[name][1:]:
                    with suppress(psutil.NoSuchProcess):
                        proc.send_signal(sig)
            _, alive = psutil.wait_procs([p for t in trees.values() for p in t], timeout=grace)
            if not alive:
                break
        for popen in self.popens.values():
            with suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=1)


def graphql(port: int, query: str) -> dict[str, Any]:
    # The webserver's GraphQL API over plain urllib: only the Graph client may use httpx.
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise NotReady(f"GraphQL errors: {body['errors']}")
    return body["data"]


def wait_until(
    what: str, probe: Callable[[], Any], deadline: float, procs: Processes, every: float = 0.5
) -> Any:
    """Poll ``probe`` until it returns something truthy, a process dies or the deadline passes."""
    last_error: Exception | None = None
    while True:
        procs.check_alive()
        try:
            value = probe()
            if value:
                return value
        except (OSError, NotReady) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise OutOfTime(f"gave up waiting for {what}{detail}")
        time.sleep(every)


def location_loaded(port: int) -> bool:
    entries = graphql(port, WORKSPACE_QUERY)["workspaceOrError"].get("locationEntries") or []
    for entry in entries:
        if entry["name"] == "atlas_dagster" and entry["loadStatus"] == "LOADED":
            error = entry["locationOrLoadError"] or {}
            if error.get("__typename") == "PythonError":
                raise BenchError(f"the code location failed to load: {error['message']}")
            return True
    return False


def daemons_healthy(port: int) -> bool:
    statuses = graphql(port, DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
    return {s["daemonType"] for s in statuses if s["healthy"]} >= NEEDED_DAEMONS


# --- Sampling the processes --------------------------------------------------------------------


def is_run_worker(proc: psutil.Process) -> bool:
    # Code servers start each run in a process of multiprocessing's spawn context; the same
    # context's resource tracker is the one other spawned process, and is no run.
    cmdline = " ".join(proc.cmdline())
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline


def is_code_server(proc: psutil.Process) -> bool:
    return "grpc" in proc.cmdline()


@dataclass
class Sampler:
    """Samples the fleet's processes: peak RSS of the daemon, of a run worker and of all of them,
    and the CPU seconds (user + system) spent so far, by role.

    A process that ended counts in its parent's ``children_*`` times once the parent reaped it:
    code servers reap their run workers, the daemon reaps the code servers it replaces. So the
    live processes account for the total; a code server keeps, after it ended, the figures it had
    at its last sample."""

    procs: Processes
    peak_daemon: int = 0
    peak_worker: int = 0
    peak_total: int = 0
    workers_seen: set[tuple[int, float]] = field(default_factory=set)
    # (own, reaped) CPU seconds of every code server, by (pid, start time).
    code_servers: dict[tuple[int, float], tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> dict[str, float]:
        with self.lock:
            return self._sample()

    def _sample(self) -> dict[str, float]:
        cpu: dict[str, float] = defaultdict(float)
        rss_total = 0
        for name, popen in self.procs.popens.items():
            for proc in self.procs.tree(name):
                try:
                    with proc.oneshot():
                        rss, times = proc.memory_info().rss, proc.cpu_times()
                        key = (proc.pid, proc.create_time())
                        worker = is_run_worker(proc)
                        code_server = not worker and is_code_server(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                own = times.user + times.system
                reaped = times.children_user + times.children_system
                rss_total += rss
                cpu["total"] += own + reaped
                if proc.pid == popen.pid:
                    cpu[name] += own
                    if name == "daemon":
                        self.peak_daemon = max(self.peak_daemon, rss)
                elif worker:
                    cpu["run_workers"] += own + reaped
                    self.peak_worker = max(self.peak_worker, rss)
                    self.workers_seen.add(key)
                elif code_server:
                    self.code_servers[key] = (own, reaped)
        for own, reaped in self.code_servers.values():
            cpu["code_servers"] += own
            cpu["run_workers"] += reaped
        self.peak_total = max(self.peak_total, rss_total)
        cpu["other"] = cpu["total"] - sum(v for k, v in cpu.items() if k != "total")
        return dict(cpu)


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def local_postmaster(engine: sa.Engine) -> psutil.Process | None:
    """The PostgreSQL server process, when it runs on this machine: the parent of our backend."""
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    try:
        return psutil.Process(pid).parent()
    except psutil.NoSuchProcess:
        return None


def tree_cpu_s(proc: psutil.Process | None) -> float:
    """CPU seconds of a process and of the children it reaped (the server's ended backends)."""
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def database_activity(engine: sa.Engine, databases: dict[str, str]) -> dict[str, dict]:
    """What PostgreSQL counted so far for each of the fleet's databases (by role): sessions
    opened, seconds spent executing statements, transactions."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT datname, sessions, active_time / 1000.0 AS active_s,"
                " xact_commit + xact_rollback AS transactions"
                " FROM pg_stat_database WHERE datname = ANY(:names)"
            ),
            {"names": list(databases.values())},
        )
        by_name = {row.datname: row for row in found}
    return {
        role: {
            "sessions": by_name[name].sessions,
            "active_s": float(by_name[name].active_s),
            "transactions": by_name[name].transactions,
        }
        for role, name in databases.items()
    }


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


# --- The fleet ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    tenant: str
    run_type: str
    row_id: int
    submitted_at: datetime
    dispatched: bool


def submit_all(config: Any, defs: Any, tenants: list[str]) -> list[Submission]:
    from atlas_dagster.ledger.run_types import Trigger
    from atlas_dagster.ledger.start import DispatchError, start_operation

    submissions = []
    for key in tenants:
        for run_type in RUN_TYPES:
            submitted_at = datetime.now(UTC)
            try:
                outcome = start_operation(
                    config,
                    run_type,
                    defs=defs,
                    connection=key,
                    schedule=f"{key}-nightly" if run_type.startswith("backup_schedule.") else None,
                    trigger_source=Trigger.API,
                    initiator="bench/fleet",
                    in_process=False,
                )
                row, dispatched = outcome.row, outcome.dispatched
            except DispatchError as exc:
                print(f"dispatch failed: {key} {run_type}: {exc}", file=sys.stderr)
                row, dispatched = exc.row, False
            submissions.append(Submission(key, run_type, row.id, submitted_at, dispatched))
    return submissions


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and max, rounded; the nearest-rank value of the sorted sample."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(pct: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))], 1)

    return {"p50": rank(50), "p95": rank(95), "max": round(ordered[-1], 1)}


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


@dataclass
class Measured:
    """What one fleet run observed, before it is summarised."""

    tenants: int
    submissions: list[Submission]
    rows: dict[int, Any]  # ledger rows by id
    active_after: int
    dagster_runs: list[Any]
    disagreements: list[dict[str, str]]
    finished: bool
    start_up_s: float
    submit_s: float
    fleet_s: float
    cpu: dict[str, float]
    machine_busy_s: float
    bench_cpu_s: float  # this process: the submissions, the polling and the sampling
    postgres_s: float | None
    database_activity: dict[str, dict[str, float]]
    sampler: Sampler


def run_fleet(tenants: int, budget_s: float, workdir: Path, urls: dict[str, str]) -> Measured:
    began = time.monotonic()
    from atlas_dagster import db

    web_port = free_port()
    dagster_home = workdir / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    config_path = workdir / "atlas.yaml"
    config_path.write_text(atlas_yaml(tenants, urls["app"], web_port))
    # This process submits the runs and reads the instance: the same instance and config.
    os.environ.update(
        DAGSTER_HOME=str(dagster_home),
        ATLAS_CONFIG=str(config_path),
        DAGSTER_PG_URL=db.sqlalchemy_url(urls["dagster"]),
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }

    from atlas_dagster.config import load_config
    from atlas_dagster.definitions import defs

    config = load_config(config_path)
    app_engine = db.engine_for(config.database_url)
    db.upgrade(app_engine)

    log_dir = workdir / "logs"
    log_dir.mkdir()
    procs = Processes(env, log_dir)
    sampler = Sampler(procs)
    try:
        procs.start(
            "webserver",
            [
                str(BIN / "dagster-webserver"),
                *("-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(web_port)),
            ],
        )
        procs.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"])
        databases = {role: str(sa.make_url(url).database) for role, url in urls.items()}
        return _measure(config, defs, sampler, web_port, databases, began, began + budget_s)
    except BaseException:
        print(procs.log_tails(), file=sys.stderr)
        raise
    finally:
        sampler.close()
        procs.stop()
        app_engine.dispose()


def _measure(
    config: Any,
    defs: Any,
    sampler: Sampler,
    web_port: int,
    databases: dict[str, str],
    began: float,
    deadline: float,
) -> Measured:
    import dagster as dg

    from atlas_dagster import db
    from atlas_dagster.ledger.store import OperationLedger

    procs = sampler.procs
    keys = [c.key for c in config.provider_connections]
    wait_until("the code location", lambda: location_loaded(web_port), deadline, procs)
    wait_until("healthy daemons", lambda: daemons_healthy(web_port), deadline, procs)
    instance = dg.DagsterInstance.get()
    try:
        # The partitions sensor adds the config's tenants as partitions on its first tick;
        # their runs need them.
        wait_until(
            "the tenants' partitions",
            lambda: set(keys) <= set(instance.get_dynamic_partitions("provider_connections")),
            deadline,
            procs,
        )
        start_up_s = time.monotonic() - began
        sampler.start()
        ledger = OperationLedger(db.engine_for(config.database_url))
        postmaster = local_postmaster(ledger.engine)
        cpu_before, busy_before, bench_before = sampler.sample(), machine_busy_s(), own_cpu_s()
        pg_before = tree_cpu_s(postmaster)
        activity_before = database_activity(ledger.engine, databases)

        fleet_began = time.monotonic()
        submissions = submit_all(config, defs, keys)
        submit_s = time.monotonic() - fleet_began
        print(f"submitted {len(submissions)} runs in {submit_s:.0f} s", file=sys.stderr)

        finished = _wait_for_fleet(ledger, instance, procs, len(submissions), deadline)
        fleet_s = time.monotonic() - fleet_began
        cpu_after, busy_after, bench_after = sampler.sample(), machine_busy_s(), own_cpu_s()
        pg_after = tree_cpu_s(postmaster)
        activity_after = database_activity(ledger.engine, databases)
        rows = {row.id: row for row in ledger.list(limit=10 * len(submissions) + 100)}
        dagster_runs = instance.get_runs()
        return Measured(
            tenants=len(keys),
            submissions=submissions,
            rows=rows,
            active_after=len(ledger.active()),
            dagster_runs=dagster_runs,
            disagreements=_disagreements(instance, rows, dagster_runs),
            finished=finished,
            start_up_s=start_up_s,
            submit_s=submit_s,
            fleet_s=fleet_s,
            cpu={k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()},
            machine_busy_s=busy_after - busy_before,
            bench_cpu_s=bench_after - bench_before,
            postgres_s=pg_after - pg_before if postmaster else None,
            database_activity={
                role: {k: v - activity_before[role][k] for k, v in after.items()}
                for role, after in activity_after.items()
            },
            sampler=sampler,
        )
    finally:
        instance.dispose()


def failure_reasons(rows: Any) -> dict[str, dict[str, Any]]:
    """Per reason code of the rows' failures: how often, and the first message."""
    reasons: dict[str, dict[str, Any]] = {}
    for row in rows:
        for entry in row.failure_summary:
            seen = reasons.setdefault(
                entry["reason_code"],
                {"count": 0, "example": f"{row.type}: {entry['message'][:300]}"},
            )
            seen["count"] += 1
    return reasons


def summary(m: Measured) -> dict:
    latencies, queued, working = [], [], []
    units: dict[str, int] = defaultdict(int)
    for sub in m.submissions:
        row = m.rows[sub.row_id]
        units[sub.tenant] += int(row.summary_counts.get("graph_request_units", 0))
        if row.completed_at:
            latencies.append((row.completed_at - sub.submitted_at).total_seconds())
        if row.started_at:
            queued.append((row.started_at - sub.submitted_at).total_seconds())
        if row.started_at and row.completed_at:
            working.append((row.completed_at - row.started_at).total_seconds())
    rows = m.rows.values()
    run_ids = [row.dagster_run_id for row in rows]
    dagster_ids = {run.run_id for run in m.dagster_runs}
    one_row_per_run = (
        len(run_ids) == len(set(run_ids)) == len(dagster_ids) and set(run_ids) == dagster_ids
    )
    runs, mb = len(m.submissions), 1024 * 1024
    completed = sum(row.status == "completed" for row in rows)
    return {
        "tenants": m.tenants,
        "profiles": dict(Counter(profile_of(i) for i in range(1, m.tenants + 1))),
        "runs": runs,
        "runs_completed": completed,
        "start_up_s": round(m.start_up_s, 1),
        "submit_s": round(m.submit_s, 1),
        "wall_s": round(m.fleet_s, 1),
        "runs_per_minute": round(60 * completed / m.fleet_s, 1),
        "submit_to_started_s": percentiles(queued),
        "started_to_completed_s": percentiles(working),
        "submit_to_completed_s": percentiles(latencies),
        "outcomes": dict(Counter(str(row.outcome) for row in rows)),
        "outcomes_by_type": {
            t: dict(Counter(str(r.outcome) for r in rows if r.type == t)) for t in RUN_TYPES
        },
        "failure_reasons": failure_reasons(rows),
        "dispatch_failures": sum(not s.dispatched for s in m.submissions),
        "peak_rss_mb": {
            "daemon": round(m.sampler.peak_daemon / mb),
            "run_worker": round(m.sampler.peak_worker / mb),
            "all_processes": round(m.sampler.peak_total / mb),
        },
        "run_workers_seen": len(m.sampler.workers_seen),
        "cpu_s": {k: round(v, 1) for k, v in sorted(m.cpu.items())},
        "cpu_s_per_run": round(m.cpu["total"] / max(completed, 1), 2),
        # The whole server (every database, other users' included), when it runs on this
        # machine: an upper bound.
        "postgres_server_cpu_s": round(m.postgres_s, 1) if m.postgres_s is not None else None,
        "postgres_activity": {
            role: {k: round(v, 1) for k, v in activity.items()}
            for role, activity in m.database_activity.items()
        },
        "bench_process_cpu_s": round(m.bench_cpu_s, 1),
        # Everything on the machine, PostgreSQL and other users included: an upper bound.
        "machine_busy_cpu_s": round(m.machine_busy_s, 1),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "graph_request_units_per_tenant": spread(list(units.values())),
        "graph_request_units_per_tenant_by_profile": {
            profile: spread([u for k, u in units.items() if profile_of(int(k[1:])) == profile])
            for profile in ("small", "medium")
        },
        "ledger": {
            "rows": len(m.rows),
            "active_after": m.active_after,
            "dagster_runs": len(dagster_ids),
            "dagster_run_statuses": dict(Counter(run.status.value for run in m.dagster_runs)),
            "one_row_per_dagster_run": one_row_per_run,
            "outcome_disagrees_with_dagster_run": m.disagreements,
            "finished_in_budget": m.finished,
        },
        "converged": m.finished and m.active_after == 0 and one_row_per_run,
    }


def _disagreements(instance: Any, rows: dict, dagster_runs: list) -> list[dict[str, str]]:
    """Runs that Dagster and the ledger judge differently: a failed run whose row succeeded, or
    a successful run whose row failed; with the first failure Dagster logged for the run."""
    import dagster as dg

    by_run = {row.dagster_run_id: row for row in rows.values()}
    found = []
    for run in dagster_runs:
        row = by_run.get(run.run_id)
        if row is None or (run.status == dg.DagsterRunStatus.FAILURE) == (row.outcome == "failed"):
            continue
        failures = instance.all_logs(
            run.run_id,
            of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE},
        )
        found.append(
            {
                "job": run.job_name,
                "dagster": run.status.value,
                "ledger": str(row.outcome),
                "first_failure": _failure_text(failures[0]) if failures else "",
            }
        )
    return found


def _failure_text(entry: Any) -> str:
    """The error of a failure event (its class and message), else the event's own message."""
    data = entry.dagster_event.event_specific_data if entry.dagster_event else None
    error = getattr(data, "error", None)
    text = f"{error.cls_name}: {error.message}" if error else entry.message
    return " ".join(text.split())[:300]


def _wait_for_fleet(
    ledger: Any, instance: Any, procs: Processes, runs: int, deadline: float
) -> bool:
    """Until no ledger row is active and every Dagster run has ended; False at the deadline."""
    import dagster as dg

    ended = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    in_flight = dg.RunsFilter(statuses=[s for s in dg.DagsterRunStatus if s not in ended])
    reported = [time.monotonic()]

    def done() -> bool:
        active = len(ledger.active())
        if time.monotonic() - reported[0] > 30:
            print(f"{runs - active}/{runs} ledger rows completed", file=sys.stderr)
            reported[0] = time.monotonic()
        return active == 0 and instance.get_runs_count(in_flight) == 0

    try:
        return wait_until("the fleet", done, deadline, procs, every=1.0)
    except OutOfTime:
        return False


def table(result: dict) -> str:
    rss, lat, led = result["peak_rss_mb"], result["submit_to_completed_s"], result["ledger"]
    units, pg = result["graph_request_units_per_tenant"], result["postgres_activity"]
    rows = [
        (
            "tenants / runs / completed",
            f"{result['tenants']} / {result['runs']} / {result['runs_completed']}",
        ),
        ("wall time (first submit → all done)", f"{result['wall_s']} s"),
        ("runs per minute", result["runs_per_minute"]),
        ("submit → completed p50 / p95", f"{lat.get('p50')} s / {lat.get('p95')} s"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"].items()))),
        ("peak RSS daemon / run worker", f"{rss['daemon']} MB / {rss['run_worker']} MB"),
        ("CPU per completed run: Dagster processes", f"{result['cpu_s_per_run']} s"),
        (
            "PostgreSQL sessions opened: Dagster / app",
            f"{pg['dagster']['sessions']} / {pg['app']['sessions']}",
        ),
        (
            "Graph request units per tenant",
            f"min {units.get('min')}, median {units.get('median')}, max {units.get('max')}",
        ),
        (
            "ledger converged",
            f"{result['converged']} ({led['active_after']} active, {led['rows']} rows for "
            f"{led['dagster_runs']} Dagster runs)",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main() -> None:
    global RUN_TYPES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=840.0,
        help="the whole bench, start-up included (default: 14 minutes)",
    )
    parser.add_argument(
        "--run-types",
        default=",".join(RUN_TYPES),
        help="what each tenant runs (e.g. directory_groups.sync alone, with --tenants 1, for the "
        "submit → completed time of one small run)",
    )
    args = parser.parse_args()
    RUN_TYPES = tuple(args.run_types.split(","))
    # A SIGTERM ends the bench through its finally blocks, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with (
            tempfile.TemporaryDirectory(prefix="atlas-fleet-") as tmp,
            fresh_databases("app", "dagster") as urls,
        ):
            result = summary(run_fleet(args.tenants, args.budget_s, Path(tmp), urls))
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, indent=2))
    print(table(result))
    if result["ledger"]["outcome_disagrees_with_dagster_run"]:
        print("WARNING: Dagster and the ledger judge some runs differently", file=sys.stderr)
    if not result["converged"]:
        print("FAILED: the ledger did not converge", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
