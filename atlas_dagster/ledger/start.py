"""Start surfaces: create the ledger row first, then dispatch the Dagster run.

A start that meets an active row of the same identity returns that row and dispatches nothing.
Dispatch is either in this process (``execute_in_process`` against the instance at
``DAGSTER_HOME``) or a submission to a running Dagster webserver through its GraphQL API.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg

from atlas_dagster import db
from atlas_dagster.config import AtlasConfig
from atlas_dagster.connections import ensure_partitions
from atlas_dagster.db import ready_engine
from atlas_dagster.ledger import liveness
from atlas_dagster.ledger.mirror import mirror_run_id
from atlas_dagster.ledger.reconcile import reap, row_dead_reason
from atlas_dagster.ledger.run_types import (
    RETRYABLE_OUTCOMES,
    RUN_TYPES,
    TAG_OPERATION_RUN_ID,
    StartRequest,
    Status,
    Trigger,
)
from atlas_dagster.ledger.store import OperationLedger, OperationRun, StartError
from atlas_dagster.reasons import one_line
from atlas_dagster.stores.backups import find_schedule

INSTANCE_TEMPLATE = Path(__file__).parent.parent / "instance" / "dagster.yaml"
LOCATION_NAME = "atlas_dagster"
# Level of the console logger of in-process runs. Step failures log their stack trace at ERROR:
# the terminal shows the ledger's one line instead; `atlas-dagster -v` asks for VERBOSE_LOG_LEVEL.
QUIET_LOG_LEVEL, VERBOSE_LOG_LEVEL = "CRITICAL", "WARNING"


class DispatchError(Exception):
    """The row was created but no run could be dispatched (exit code 1)."""

    def __init__(self, message: str, row: OperationRun):
        super().__init__(message)
        self.row = row


@dataclass(frozen=True)
class StartOutcome:
    row: OperationRun
    created: bool
    dispatched: bool


def job_names(defs: dg.Definitions) -> set[str]:
    return {job.name for job in defs.resolve_all_job_defs()}


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to ``.atlas/dagster`` with the shipped instance config."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".atlas/dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(INSTANCE_TEMPLATE, target)
    return home


def open_instance() -> dg.DagsterInstance:
    """The Dagster instance of DAGSTER_HOME. Opening one creates its storage schema on first use;
    concurrent first starts (cron jobs on a fresh machine) take turns, or Dagster's own
    migrations race each other."""
    home = ensure_dagster_home()
    with open(home / ".atlas-open.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dg.DagsterInstance.get()


def start_operation(
    config: AtlasConfig,
    run_type: str,
    *,
    defs: dg.Definitions,
    connection: str | None = None,
    schedule: str | None = None,
    retry_of: int | None = None,
    scheduled_for: datetime | None = None,
    trigger_source: str = Trigger.CLI,
    initiator: str | None = None,
    in_process: bool = False,
    instance: dg.DagsterInstance | None = None,
    accept_deletions: bool = False,
    console_log_level: str = QUIET_LOG_LEVEL,
    backup_set_id: int | None = None,
    target_scope: str | None = None,
    restore_run_id: int | None = None,
) -> StartOutcome:
    """Create the ledger row of one operation and dispatch its run — or, when an active row of
    the same identity exists and its work is alive, return that row and dispatch nothing. A dead
    holder (see liveness.py) is reaped first, so a crashed start never blocks its identity."""
    rt = RUN_TYPES.get(run_type)
    if rt is None:
        raise StartError(f"unknown run type {run_type!r} (one of {', '.join(RUN_TYPES)})")
    if rt.job_name not in job_names(defs):
        raise StartError(f"run type {run_type} has no job yet ({rt.job_name} is not defined)")
    engine = ready_engine(config)
    ledger = OperationLedger(engine)
    schedule_id: int | None = None

    if retry_of is not None:
        if run_type != "backup_schedule.retry":
            raise StartError("--retry-of applies to backup_schedule.retry only")
        retried = _retry_schedule(ledger, retry_of)
        if schedule and schedule != retried:
            raise StartError(
                f"operation run #{retry_of} is a backup of schedule {retried!r}, not {schedule!r}"
            )
        schedule = retried
    if accept_deletions and run_type != "inventory.sync":
        raise StartError("--accept-deletions applies to inventory.sync only")
    if rt.needs_schedule:
        if not schedule:
            raise StartError(f"{run_type} needs --schedule")
        try:
            conn_key = config.schedule(schedule).provider_connection
        except KeyError:
            raise StartError(f"no backup schedule {schedule!r} in the config") from None
        # ready_engine wrote the config's schedules into the database.
        srow = find_schedule(engine, key=schedule)
        assert srow is not None
        if connection and connection != conn_key:
            raise StartError(f"schedule {schedule!r} belongs to connection {conn_key!r}")
        connection, schedule_id = conn_key, srow.id
        if run_type == "backup_schedule.retry" and retry_of is None:
            raise StartError("backup_schedule.retry needs --retry-of ID")
        if run_type == "backup_schedule.scheduled" and scheduled_for is None:
            raise StartError("backup_schedule.scheduled is started by its schedule only")
    if not connection:
        raise StartError(f"{run_type} needs --connection")
    if connection not in {c.key for c in config.provider_connections}:
        raise StartError(f"no provider connection {connection!r} in the config ({config.source})")
    request = StartRequest(
        rt,
        connection_key=connection,
        # ready_engine wrote the config's entries
        connection_id=db.connection_ids(engine)[connection],
        trigger=Trigger(trigger_source),
        initiator=initiator or _whoami(),
        schedule_id=schedule_id,
        schedule_key=schedule if rt.needs_schedule else None,
        scheduled_for=scheduled_for.isoformat() if scheduled_for else None,
        retry_of=retry_of,
        accept_deletions=accept_deletions,
        backup_set_id=backup_set_id,
        target_scope=target_scope,
        restore_run_id=restore_run_id,
    )

    if in_process and instance is None:
        instance = open_instance()
    # An in-process start runs the work itself: the row records this process from its creation.
    token = uuid.uuid4().hex if in_process else None
    executor = liveness.here().to_dict() if in_process else None
    for _ in range(5):
        started = ledger.open(request, executor=executor, executor_token=token)
        if started.created or not _settle(ledger, started.row, instance or _known_instance()):
            break
    if not started.created:
        return StartOutcome(started.row, created=False, dispatched=False)
    tags = {**request.tags(started.row.id), "dagster/partition": connection}
    try:
        if in_process:
            assert instance is not None
            row = _execute_in_process(
                ledger, defs, rt.job_name, connection, tags, instance, console_log_level
            )
        else:
            row = _submit(ledger, config, rt.job_name, tags, started.row)
    except DispatchError:
        raise
    except Exception as exc:  # any failure to hand the run over is a dispatch failure
        ledger.fail_dispatch(started.row.id, one_line(exc))
        raise DispatchError(one_line(exc), ledger.get(started.row.id) or started.row) from None
    return StartOutcome(row, created=True, dispatched=True)


def _settle(
    ledger: OperationLedger, row: OperationRun, instance: dg.DagsterInstance | None
) -> bool:
    """Whether the active row a start met turned out to be over: its work is dead (reaped here),
    or its Dagster run ended without the mirror having seen it yet."""
    if row.status == Status.COMPLETED:
        return False  # a strict identity, taken for good
    reason = row_dead_reason(row)
    if reason:
        reap(ledger, row, reason, instance)
        return True
    if instance is not None and row.dagster_run_id:
        fresh = mirror_run_id(ledger, instance, row.dagster_run_id)
        return fresh is not None and fresh.status == Status.COMPLETED
    return False


def _known_instance() -> dg.DagsterInstance | None:
    """The Dagster instance of DAGSTER_HOME when the caller set one: then a start can settle an
    active row whose run Dagster already ended."""
    if not os.environ.get("DAGSTER_HOME"):
        return None
    try:
        return open_instance()
    except Exception:
        return None


def _retry_schedule(ledger: OperationLedger, retry_of: int) -> str:
    original = ledger.get(retry_of)
    if original is None or not original.type.startswith("backup_schedule."):
        raise StartError(f"operation run #{retry_of} is not a backup run")
    if original.status != Status.COMPLETED or original.outcome not in RETRYABLE_OUTCOMES:
        raise StartError(
            f"operation run #{retry_of} is {original.status}/{original.outcome}; only failed or "
            "partially succeeded backups can be retried"
        )
    key = original.context.get("backup_schedule_key")
    if not key:
        raise StartError(f"operation run #{retry_of} names no backup schedule")
    return str(key)


def _execute_in_process(
    ledger: OperationLedger,
    defs: dg.Definitions,
    job_name: str,
    partition: str,
    tags: dict[str, str],
    instance: dg.DagsterInstance,
    console_log_level: str,
) -> OperationRun:
    ensure_partitions(instance, [partition])
    run_id = str(uuid.uuid4())
    row_id = int(tags[TAG_OPERATION_RUN_ID])
    ledger.attach_dagster_run(row_id, run_id)
    job = defs.resolve_job_def(job_name)
    job.execute_in_process(
        instance=instance,
        partition_key=partition,
        tags={k: v for k, v in tags.items() if k != "dagster/partition"},
        run_id=run_id,
        raise_on_error=False,
        # The full event log is in the Dagster UI.
        run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}},
    )
    # No daemon watches in-process runs: mirror the finished run here, by the same code path.
    row = mirror_run_id(ledger, instance, run_id)
    if row is None:
        raise RuntimeError(f"Dagster run {run_id} vanished")
    return row


def _submit(
    ledger: OperationLedger,
    config: AtlasConfig,
    job_name: str,
    tags: dict[str, str],
    row: OperationRun,
) -> OperationRun:
    from urllib.parse import urlsplit

    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    url = urlsplit(config.dagster_webserver_url)
    client = DagsterGraphQLClient(
        url.hostname or "127.0.0.1",
        port_number=url.port,
        use_https=url.scheme == "https",
        timeout=30,
    )
    try:
        run_id = client.submit_job_execution(
            job_name, repository_location_name=LOCATION_NAME, tags=tags
        )
    except DagsterGraphQLClientError as exc:
        message = (
            f"could not submit {job_name} to the Dagster webserver at "
            f"{config.dagster_webserver_url}: {one_line(exc)}"
        )
        ledger.fail_dispatch(row.id, message)
        raise DispatchError(message, ledger.get(row.id) or row) from None
    ledger.attach_dagster_run(row.id, run_id)
    return ledger.get(row.id) or row


def wait_for(
    ledger: OperationLedger, row_id: int, timeout: float, poll: float = 1.0
) -> OperationRun:
    """Poll a row until it completes (the daemon's mirror completes it)."""
    deadline = time.monotonic() + timeout
    while True:
        row = ledger.get(row_id)
        assert row is not None
        if row.status == Status.COMPLETED or time.monotonic() > deadline:
            return row
        time.sleep(poll)


def _whoami() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
