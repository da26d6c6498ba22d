"""What the ledger knows about operations, as data: run types, statuses, outcomes, trigger
sources, the run identity, and the Dagster run tags that link a run to its row.

Importable without Dagster (jobs are named as strings), so commands that only read the ledger
stay fast. See docs/architecture.md for how a run moves through these states.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TAG_OPERATION_RUN_ID = "atlas/operation_run_id"
TAG_RUN_TYPE = "atlas/run_type"
TAG_BACKUP_SCHEDULE = "atlas/backup_schedule"
# The ledger's verdict, written onto the Dagster run once its row completed.
TAG_OUTCOME = "atlas/outcome"
TAG_CONNECTION = "atlas/connection"
TAG_REASON_PREFIX = "atlas/reason/"


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"


ACTIVE = (Status.QUEUED, Status.RUNNING)


class Outcome(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_OUTCOMES = frozenset(Outcome) - {Outcome.PENDING}
# A backup that did not fully succeed may be retried.
RETRYABLE_OUTCOMES = frozenset({Outcome.FAILED, Outcome.PARTIALLY_SUCCEEDED})


class Trigger(StrEnum):
    CLI = "cli"
    DAGSTER_UI = "dagster_ui"
    SCHEDULE = "schedule"
    SENSOR = "sensor"
    BACKFILL = "backfill"
    API = "api"
    DEMO = "demo"


class Identity(StrEnum):
    # connection + target scope, deduped while active
    DETERMINISTIC = "deterministic"
    # one per start (a nonce), never deduped
    NONCE = "nonce"
    # the run type's strict keys (a schedule and its time, a restore plan), taken once in any
    # status
    STRICT = "strict"


@dataclass(frozen=True)
class RunType:
    name: str
    identity: Identity
    job_name: str
    asset: str
    needs_schedule: bool = False
    # A strict identity's context keys.
    strict_keys: tuple[str, ...] = ("backup_schedule_id", "scheduled_for")

    def identity_hash(self, parts: Mapping[str, Any]) -> str:
        """What makes two starts "the same operation" for this run type."""
        if self.identity is Identity.DETERMINISTIC:
            key = {
                "provider_connection_id": parts["provider_connection_id"],
                "target_scope": parts.get("target_scope") or "all",
            }
        elif self.identity is Identity.NONCE:
            key = {"nonce": parts["nonce"]}
        else:
            key = {name: parts[name] for name in self.strict_keys}
        canonical = json.dumps({"type": self.name, **key}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


RUN_TYPES: dict[str, RunType] = {
    t.name: t
    for t in (
        RunType("inventory.sync", Identity.DETERMINISTIC, "inventory_sync_job", "inventory"),
        RunType(
            "directory_groups.sync",
            Identity.DETERMINISTIC,
            "directory_groups_sync_job",
            "directory_groups",
        ),
        RunType(
            "provider_connection.verify",
            Identity.DETERMINISTIC,
            "provider_connection_verify_job",
            "provider_connection_checks",
        ),
        RunType(
            "backup_schedule.run_now", Identity.NONCE, "backup_job", "backups", needs_schedule=True
        ),
        RunType(
            "backup_schedule.retry", Identity.NONCE, "backup_job", "backups", needs_schedule=True
        ),
        RunType(
            "backup_schedule.scheduled",
            Identity.STRICT,
            "backup_job",
            "backups",
            needs_schedule=True,
        ),
        # A plan's identity is its target, backup set and selection (in target_scope).
        RunType("restore.plan", Identity.DETERMINISTIC, "restore_plan_job", "restore_plan"),
        RunType(
            "restore.execute",
            Identity.STRICT,
            "restore_execute_job",
            "restore_execution",
            strict_keys=("restore_run_id",),
        ),
    )
}

# A job's run type when its runs do not say (the Dagster UI). A job shared by several run types
# (backups) is its first, user-facing type.
JOB_TYPES: dict[str, RunType] = {}
for _rt in RUN_TYPES.values():
    JOB_TYPES.setdefault(_rt.job_name, _rt)
LEDGER_JOBS = frozenset(JOB_TYPES)


@dataclass(frozen=True)
class StartRequest:
    """Everything a start surface (the CLI, a refresh schedule, a backup schedule's tick, the
    mirror adopting a run launched elsewhere) says about a new operation. Its ``context`` and
    ``tags`` are the one place the row's context keys and the run's tags are spelled."""

    run_type: RunType
    connection_key: str | None
    connection_id: int | None
    trigger: Trigger
    initiator: str
    schedule_id: int | None = None
    schedule_key: str | None = None
    scheduled_for: str | None = None
    retry_of: int | None = None
    accept_deletions: bool = False
    # Restore: the set a plan restores and what it selects (target_scope), the plan an
    # execution runs.
    backup_set_id: int | None = None
    target_scope: str | None = None
    restore_run_id: int | None = None
    # The mirror's adoption: the run it adopts, and the identity its job takes when it starts.
    adopted_run_id: str | None = None
    pending_identity: str | None = None

    def context(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "provider_connection_key": self.connection_key,
            "backup_schedule_id": self.schedule_id,
            "backup_schedule_key": self.schedule_key,
            "scheduled_for": self.scheduled_for,
            "retry_of": self.retry_of,
            "accept_deletions": self.accept_deletions or None,
            "backup_schedule_run_id": self.backup_set_id,
            "target_scope": self.target_scope,
            "restore_run_id": self.restore_run_id,
            "pending_identity": self.pending_identity,
        }
        if self.adopted_run_id:
            values["adopted"] = True
            if self.run_type.identity is Identity.NONCE:
                values["nonce"] = self.adopted_run_id
        return {k: v for k, v in values.items() if v is not None}

    def tags(self, row_id: int) -> dict[str, str]:
        """The Dagster run tags that tie the run to its row."""
        tags = {TAG_OPERATION_RUN_ID: str(row_id), TAG_RUN_TYPE: self.run_type.name}
        if self.schedule_key:
            tags[TAG_BACKUP_SCHEDULE] = self.schedule_key
        return tags
