"""``restore_plans`` and ``restore_items``: a plan, its items, and each item's result.

A plan moves ``planned → executing → executed``, forward only; ``take`` is the one atomic
update that lets exactly one execution write (DESIGN §9, exactly once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema

PLANNED, EXECUTING, EXECUTED = "planned", "executing", "executed"
PLAN_LIFETIME = timedelta(days=1)


@dataclass(frozen=True)
class RestoreItem:
    position: int
    contract_key: str
    policy_type: str | None
    display_name: str | None
    source_external_id: str
    target_external_id: str | None
    action: str
    reason_code: str | None
    message: str | None
    changes: list[dict[str, Any]]
    writes: list[dict[str, Any]]
    target_hash_at_plan: str | None
    planned_view: dict[str, Any] | None = None
    result: str | None = None
    verified: bool | None = None
    error: str | None = None
    completed_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["completed_at"] = self.completed_at.isoformat() if self.completed_at else None
        return out


@dataclass(frozen=True)
class RestorePlan:
    id: int
    backup_set_id: int
    source_provider_connection_id: int
    provider_connection_id: int
    provider_connection: str
    target_tenant_id: str
    selection: dict[str, Any]
    options: dict[str, Any]
    status: str
    created_at: datetime
    expires_at: datetime
    executed_at: datetime | None
    completed_at: datetime | None
    operation_run_id: int | None
    execute_operation_run_id: int | None
    summary_counts: dict[str, Any]
    # The ledger's word on the execution (its operation run's outcome once completed): a plan
    # left ``executing`` by an execution that died says so, and never runs again.
    execution_outcome: str | None = None

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    @property
    def interrupted(self) -> bool:
        return self.status == EXECUTING and self.execution_outcome is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        out["interrupted"] = self.interrupted
        return out


def save_plan(
    engine: Engine,
    *,
    backup_set_id: int,
    source_connection_id: int,
    connection_id: int,
    target_tenant_id: str,
    selection: Mapping[str, Any],
    options: Mapping[str, Any],
    operation_run_id: int | None,
    items: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    now: datetime | None = None,
) -> int:
    """Store a plan and its items in one transaction; the plan's id."""
    now = now or schema.utcnow()
    with engine.begin() as conn:
        plan_id = conn.execute(
            schema.restore_plans.insert().values(
                backup_set_id=backup_set_id,
                source_provider_connection_id=source_connection_id,
                provider_connection_id=connection_id,
                target_tenant_id=target_tenant_id,
                selection=dict(selection),
                options=dict(options),
                status=PLANNED,
                created_at=now,
                expires_at=now + PLAN_LIFETIME,
                operation_run_id=operation_run_id,
                summary_counts=dict(summary),
            )
        ).inserted_primary_key[0]
        if items:
            conn.execute(
                schema.restore_items.insert(),
                [{**item, "restore_plan_id": plan_id} for item in items],
            )
    return int(plan_id)


def _plan_query() -> sa.Select:
    p, pc, r = schema.restore_plans, schema.provider_connections, schema.operation_runs
    # The execution's outcome only once its row completed (a pending row has none).
    outcome = sa.case((r.c.status == "completed", r.c.outcome), else_=None)
    return (
        sa.select(p, pc.c.key.label("connection_key"), outcome.label("execution_outcome"))
        .join(pc, pc.c.id == p.c.provider_connection_id)
        .outerjoin(r, r.c.id == p.c.execute_operation_run_id)
    )


def _plan(r: Any) -> RestorePlan:
    m = r._mapping
    named = {"provider_connection": m["connection_key"]}
    return RestorePlan(
        **{f: m[f] for f in RestorePlan.__dataclass_fields__ if f not in named}, **named
    )


def get_plan(engine: Engine, plan_id: int) -> RestorePlan | None:
    with engine.connect() as conn:
        r = conn.execute(_plan_query().where(schema.restore_plans.c.id == plan_id)).first()
    return _plan(r) if r else None


def plan_items(engine: Engine, plan_id: int) -> list[RestoreItem]:
    i = schema.restore_items
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(i).where(i.c.restore_plan_id == plan_id).order_by(i.c.position)
        )
        return [
            RestoreItem(**{f: r._mapping[f] for f in RestoreItem.__dataclass_fields__})
            for r in rows
        ]


def take(engine: Engine, plan_id: int, execute_run_id: int, now: datetime) -> bool:
    """``planned → executing``, only for an unexpired plan, in one update: True for exactly one
    caller ever."""
    p = schema.restore_plans
    with engine.begin() as conn:
        taken = conn.execute(
            p.update()
            .where(p.c.id == plan_id, p.c.status == PLANNED, p.c.expires_at > now)
            .values(status=EXECUTING, executed_at=now, execute_operation_run_id=execute_run_id)
        ).rowcount
    return taken == 1


def record_items(engine: Engine, plan_id: int, results: Sequence[Mapping[str, Any]]) -> None:
    """Items' results (each with its ``position``), in one transaction."""
    if not results:
        return
    i = schema.restore_items
    statement = (
        i.update()
        .where(i.c.restore_plan_id == plan_id, i.c.position == sa.bindparam("at"))
        .values({k: sa.bindparam(k) for k in results[0] if k != "position"})
    )
    with engine.begin() as conn:
        conn.execute(statement, [{**r, "at": r["position"]} for r in results])


def finish(engine: Engine, plan_id: int, summary: Mapping[str, Any]) -> None:
    """``executing → executed`` with the execution's counts."""
    p = schema.restore_plans
    with engine.begin() as conn:
        conn.execute(
            p.update()
            .where(p.c.id == plan_id, p.c.status == EXECUTING)
            .values(status=EXECUTED, completed_at=schema.utcnow(), summary_counts=dict(summary))
        )
