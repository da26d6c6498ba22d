"""The operation ledger's store: ``operation_runs`` rows, created, read and moved forward.

Every start surface creates its row here before it dispatches anything. Identity and dedupe are
enforced by the database itself (partial unique indexes), so concurrent starts from any number of
processes converge on one active row. Status and outcome only move forward. Importable without
Dagster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from atlas_dagster import schema
from atlas_dagster.ledger.run_types import (
    ACTIVE,
    RUN_TYPES,
    TERMINAL_OUTCOMES,
    Identity,
    Outcome,
    RunType,
    StartRequest,
    Status,
    Trigger,
)
from atlas_dagster.reasons import DISPATCH_FAILED, failure


class LedgerError(Exception):
    """A start that cannot be made (unknown type, missing connection or schedule, …)."""


class StartError(Exception):
    """A start that is not possible as asked (a command answers it with exit code 2)."""


class FencedOut(Exception):
    """A write of work whose ledger row is no longer running under its executor (it completed,
    e.g. because the reconciler found the work dead): the write is refused, nothing commits."""


@dataclass(frozen=True)
class OperationRun:
    id: int
    provider_connection_id: int | None
    type: str
    status: str
    outcome: str
    run_identity_hash: str
    context: dict[str, Any]
    summary_counts: dict[str, Any]
    failure_summary: list[dict[str, Any]]
    trigger_source: str
    initiator: str
    dagster_run_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    executor: dict[str, Any] | None = None
    heartbeat_at: datetime | None = None
    executor_token: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # The token only fences writes; it means nothing to a reader.
        del out["executor_token"]
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        return out


@dataclass(frozen=True)
class Started:
    row: OperationRun
    created: bool


def related_links(row: OperationRun | Mapping[str, Any], base_url: str) -> dict[str, str]:
    """Deep links for a ledger row, built from its context (and run id) alone: no lookups."""
    data = row.to_dict() if isinstance(row, OperationRun) else dict(row)
    context = data.get("context") or {}
    base = base_url.rstrip("/")
    links: dict[str, str] = {}
    if data.get("dagster_run_id"):
        links["dagster_run"] = f"{base}/runs/{data['dagster_run_id']}"
    run_type = RUN_TYPES.get(str(data.get("type")))
    asset = run_type.asset if run_type else None
    partition = context.get("provider_connection_key")
    if asset and partition:
        links["asset"] = f"{base}/assets/{asset}?view=partitions&partition={partition}"
    if context.get("backup_schedule_run_id"):
        links["backup_set"] = f"atlas-dagster backups export {context['backup_schedule_run_id']}"
    for key in ("retry_of", "restore_run_id"):
        if context.get(key):
            links[key] = f"atlas-dagster runs --id {context[key]}"
    return links


def _row(r: Any) -> OperationRun:
    return OperationRun(
        id=r.id,
        provider_connection_id=r.provider_connection_id,
        type=r.type,
        status=r.status,
        outcome=r.outcome,
        run_identity_hash=r.run_identity_hash,
        context=dict(r.context or {}),
        summary_counts=dict(r.summary_counts or {}),
        failure_summary=list(r.failure_summary or []),
        trigger_source=r.trigger_source,
        initiator=r.initiator,
        dagster_run_id=r.dagster_run_id,
        created_at=r.created_at,
        started_at=r.started_at,
        completed_at=r.completed_at,
        updated_at=r.updated_at,
        executor=dict(r.executor) if r.executor else None,
        heartbeat_at=r.heartbeat_at,
        executor_token=r.executor_token,
    )


@dataclass
class OperationLedger:
    """Ledger operations over one engine. Safe to share across threads."""

    engine: Engine
    t: sa.Table = field(default=schema.operation_runs, repr=False)

    # --- Reads ---------------------------------------------------------------------------

    def get(self, row_id: int) -> OperationRun | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(self.t).where(self.t.c.id == row_id)).first()
        return _row(r) if r else None

    def find_by_dagster_run(self, dagster_run_id: str) -> OperationRun | None:
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(self.t).where(self.t.c.dagster_run_id == dagster_run_id)
            ).first()
        return _row(r) if r else None

    def list(
        self,
        *,
        provider_connection_id: int | None = None,
        type: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[OperationRun]:
        q = sa.select(self.t).order_by(self.t.c.id.desc()).limit(limit)
        if provider_connection_id is not None:
            q = q.where(self.t.c.provider_connection_id == provider_connection_id)
        if type is not None:
            q = q.where(self.t.c.type == type)
        if status is not None:
            q = q.where(self.t.c.status == status)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def active(self) -> list[OperationRun]:
        q = sa.select(self.t).where(self.t.c.status.in_(ACTIVE))
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q.order_by(self.t.c.id))]

    # --- Starts --------------------------------------------------------------------------

    def open(self, request: StartRequest, **options: Any) -> Started:
        """The typed start every start surface uses: the row of ``request``; ``options`` are
        ``start``'s (run id, creation time, identity override, executor)."""
        return self.start(
            request.run_type.name,
            provider_connection_id=request.connection_id,
            trigger_source=request.trigger,
            initiator=request.initiator,
            context=request.context(),
            **options,
        )

    def start(
        self,
        run_type: str,
        *,
        provider_connection_id: int | None,
        trigger_source: str,
        initiator: str,
        context: Mapping[str, Any] | None = None,
        dagster_run_id: str | None = None,
        created_at: datetime | None = None,
        identity: str | None = None,
        executor: Mapping[str, Any] | None = None,
        executor_token: str | None = None,
    ) -> Started:
        """Create the row of a new operation, or return the row that already holds its identity.

        ``context`` carries the identity parts (``target_scope``, ``backup_schedule_id``,
        ``scheduled_for``; ``nonce`` is generated for nonce types when absent). ``identity``
        overrides the computed identity hash (the mirror's placeholder for adopted runs).
        ``executor``/``executor_token`` record where the work will run when the starter runs it
        itself (an in-process start), so the row is judged alive from its creation.
        """
        rt = RUN_TYPES.get(run_type)
        if rt is None:
            raise LedgerError(f"unknown run type {run_type!r}")
        try:
            Trigger(trigger_source)
        except ValueError:
            raise LedgerError(f"unknown trigger source {trigger_source!r}") from None
        ctx = dict(context or {})
        ctx.setdefault("provider_connection_id", provider_connection_id)
        ctx.setdefault("trigger_source", trigger_source)
        ctx.setdefault("initiator", initiator)
        if rt.identity is Identity.DETERMINISTIC:
            ctx.setdefault("target_scope", "all")
        if rt.identity is Identity.NONCE:
            ctx.setdefault("nonce", uuid.uuid4().hex)
        if (
            rt.identity is Identity.STRICT
            and identity is None
            and not all(ctx.get(k) for k in rt.strict_keys)
        ):
            raise LedgerError(f"a {rt.name} run needs {' and '.join(rt.strict_keys)}")
        digest = identity or rt.identity_hash(ctx)
        now = created_at or schema.utcnow()
        values = {
            "provider_connection_id": provider_connection_id,
            "type": rt.name,
            "status": Status.QUEUED,
            "outcome": Outcome.PENDING,
            "run_identity_hash": digest,
            "context": ctx,
            "summary_counts": {},
            "failure_summary": [],
            "trigger_source": trigger_source,
            "initiator": initiator,
            "dagster_run_id": dagster_run_id,
            "created_at": now,
            "started_at": None,
            "updated_at": now,
            "executor": dict(executor) if executor else None,
            "executor_token": executor_token,
            "heartbeat_at": now if executor else None,
        }
        # Insert-or-find, retried because the active row we collided with may complete between
        # our failed insert and our read; then the identity is free again.
        for _ in range(50):
            try:
                with self.engine.begin() as conn:
                    new_id = conn.execute(self.t.insert().values(**values)).inserted_primary_key[0]
                row = self.get(new_id)
                assert row is not None
                return Started(row, True)
            except IntegrityError:
                existing = self._holder(rt, provider_connection_id, digest)
                if existing is not None:
                    return Started(existing, False)
                if dagster_run_id is not None:
                    existing = self.find_by_dagster_run(dagster_run_id)
                    if existing is not None:
                        return Started(existing, False)
        raise LedgerError(f"could not settle the identity of a {run_type} start")

    def _holder(self, rt: RunType | None, conn_id: int | None, digest: str) -> OperationRun | None:
        q = sa.select(self.t).where(self.t.c.run_identity_hash == digest)
        if rt is not None and rt.identity is Identity.STRICT:
            q = q.where(self.t.c.type == rt.name)
        else:
            q = q.where(
                self.t.c.status.in_(ACTIVE),
                self.t.c.provider_connection_id == conn_id
                if conn_id is not None
                else self.t.c.provider_connection_id.is_(None),
            )
        with self.engine.connect() as conn:
            r = conn.execute(q).first()
        return _row(r) if r else None

    def holder_of_identity(self, conn_id: int | None, digest: str) -> OperationRun | None:
        """The active row holding a deterministic identity, if any."""
        return self._holder(None, conn_id, digest)

    def take_identity(self, row_id: int, digest: str) -> bool:
        """Give an active row the identity ``digest``; False when another active row holds it."""
        try:
            return self._update(row_id, self.t.c.status.in_(ACTIVE), run_identity_hash=digest)
        except IntegrityError:
            return False

    # --- Transitions (each moves forward only) ---------------------------------------------

    def attach_dagster_run(self, row_id: int, dagster_run_id: str) -> bool:
        return self._update(
            row_id,
            (self.t.c.dagster_run_id.is_(None) | (self.t.c.dagster_run_id == dagster_run_id)),
            dagster_run_id=dagster_run_id,
        )

    def take_executor(self, row_id: int, executor: Mapping[str, Any], token: str) -> bool:
        """Record where an active row's work runs, with a fresh fencing token and heartbeat."""
        return self._update(
            row_id,
            self.t.c.status.in_(ACTIVE),
            executor=dict(executor),
            executor_token=token,
            heartbeat_at=schema.utcnow(),
        )

    def heartbeat(self, row_id: int, token: str) -> bool:
        """False once the row is no longer active under ``token``: the work has lost its row."""
        now = schema.utcnow()
        return self._update(
            row_id,
            self.t.c.status.in_(ACTIVE) & (self.t.c.executor_token == token),
            heartbeat_at=now,
            updated_at=now,
        )

    def take_slot(
        self, row_id: int, token: str, *, dagster_run_id: str | None = None
    ) -> OperationRun | None:
        """Mark the row running, if its tenant has no other running row: the runs of one tenant
        are serialised whichever way they were launched (the Dagster queue limits only the runs
        it launches). Returns the running row in the way, or None once this row runs.

        The check and the update share one transaction, serialised per tenant: SQLite's write
        transactions take the database lock up front; PostgreSQL locks the connection's row."""
        t, pc = self.t, schema.provider_connections
        now = schema.utcnow()
        with self.engine.begin() as conn:
            own = conn.execute(
                sa.select(t.c.provider_connection_id).where(t.c.id == row_id)
            ).first()
            conn_id = own.provider_connection_id if own else None
            if conn_id is not None:
                conn.execute(sa.select(pc.c.id).where(pc.c.id == conn_id).with_for_update())
                holder = conn.execute(
                    sa.select(t)
                    .where(
                        t.c.provider_connection_id == conn_id,
                        t.c.status == Status.RUNNING,
                        t.c.id != row_id,
                    )
                    .order_by(t.c.id)
                ).first()
                if holder is not None:
                    return _row(holder)
            values: dict[str, Any] = {
                "status": Status.RUNNING,
                "started_at": sa.func.coalesce(t.c.started_at, now),
                "heartbeat_at": now,
                "updated_at": now,
            }
            if dagster_run_id:
                values["dagster_run_id"] = dagster_run_id
            result = conn.execute(
                t.update()
                .where(
                    t.c.id == row_id,
                    t.c.status.in_(ACTIVE),
                    t.c.executor_token == token,
                )
                .values(**values)
            )
            if result.rowcount != 1:
                raise FencedOut(f"operation run #{row_id} is no longer active under this run")
        return None

    def fence(self, conn: sa.Connection, row_id: int, token: str) -> None:
        """Inside a write transaction: let it commit only while the row runs under ``token``.
        The update also locks the row until the transaction ends, so a completion (by the
        reconciler, say) waits for an in-flight write and every later write sees it."""
        result = conn.execute(
            self.t.update()
            .where(
                self.t.c.id == row_id,
                self.t.c.status == Status.RUNNING,
                self.t.c.executor_token == token,
            )
            .values(heartbeat_at=schema.utcnow())
        )
        if result.rowcount != 1:
            raise FencedOut(
                f"operation run #{row_id} is no longer running under this execution; "
                "its work may not write any more"
            )

    def record_progress(
        self,
        row_id: int,
        *,
        summary_counts: Mapping[str, Any] | None = None,
        failures: Iterable[Mapping[str, Any]] = (),
        context: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> bool:
        """Merge counts and context, append failures — while the row is still active (and, with
        ``token``, still owned by that execution)."""
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.select(self.t.c.summary_counts, self.t.c.failure_summary, self.t.c.context)
                .where(self.t.c.id == row_id, self._owned(token))
                .with_for_update()
            ).first()
            if r is None:
                return False
            values: dict[str, Any] = {"updated_at": schema.utcnow()}
            if summary_counts:
                values["summary_counts"] = {**(r.summary_counts or {}), **summary_counts}
            new_failures = [dict(f) for f in failures]
            if new_failures:
                values["failure_summary"] = list(r.failure_summary or []) + new_failures
            if context:
                values["context"] = {**(r.context or {}), **context}
            conn.execute(self.t.update().where(self.t.c.id == row_id).values(**values))
        return True

    def complete(
        self,
        row_id: int,
        outcome: str,
        *,
        failures: Iterable[Mapping[str, Any]] = (),
        started_at: datetime | None = None,
        completed_at: datetime | None = None,
        token: str | None = None,
    ) -> bool:
        """Complete an active row (with ``token``: only while that execution owns it). A
        completed row never changes again: returns False then."""
        if outcome not in TERMINAL_OUTCOMES:
            raise LedgerError(f"not a terminal outcome: {outcome!r}")
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.select(self.t.c.failure_summary)
                .where(self.t.c.id == row_id, self._owned(token))
                .with_for_update()
            ).first()
            if r is None:
                return False
            done = completed_at or schema.utcnow()
            values: dict[str, Any] = {
                "status": Status.COMPLETED,
                "outcome": outcome,
                "completed_at": done,
                "started_at": started_at or self.t.c.started_at,
                "updated_at": schema.utcnow(),
                "failure_summary": list(r.failure_summary or []) + [dict(f) for f in failures],
            }
            result = conn.execute(
                self.t.update().where(self.t.c.id == row_id, self._owned(token)).values(**values)
            )
        return result.rowcount == 1

    def fail_dispatch(self, row_id: int, message: str) -> bool:
        return self.complete(row_id, Outcome.FAILED, failures=[failure(DISPATCH_FAILED, message)])

    def expire_undispatched(self, grace: timedelta, *, now: datetime | None = None) -> list[int]:
        """Queued rows that never got a Dagster run within ``grace`` are failed dispatches."""
        cutoff = (now or schema.utcnow()) - grace
        q = sa.select(self.t.c.id).where(
            self.t.c.status == Status.QUEUED,
            self.t.c.dagster_run_id.is_(None),
            self.t.c.created_at < cutoff,
        )
        with self.engine.connect() as conn:
            ids = [r.id for r in conn.execute(q)]
        return [
            i
            for i in ids
            if self.fail_dispatch(i, f"no Dagster run was launched within {grace} of the start")
        ]

    def _owned(self, token: str | None) -> sa.ColumnElement[bool]:
        active = self.t.c.status.in_(ACTIVE)
        return active if token is None else active & (self.t.c.executor_token == token)

    def _update(self, row_id: int, condition: Any, **values: Any) -> bool:
        values.setdefault("updated_at", schema.utcnow())
        with self.engine.begin() as conn:
            result = conn.execute(
                self.t.update().where(self.t.c.id == row_id, condition).values(**values)
            )
        return result.rowcount == 1
