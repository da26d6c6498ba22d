"""The versioned backup store: backup sets, their items, and payloads stored once per content hash.

A payload is the policy object exactly as Graph returned it (canonical JSON: sorted keys, no
whitespace). It is keyed by ``graph_contracts.content_hash`` — the hash inventory uses, which
ignores volatile fields and the order of unordered arrays — so a policy that did not change costs
no new payload storage, and its payload is the one first seen with that content.

Payloads are JSON text, in which a NUL is the escape ``\\u0000``, so they hold any string Graph
returns on both backends and export exactly; a display name (for people) shows a NUL as ``␀``
(``bulk.text_cell``). An object the store cannot hold fails its whole type, by name (see
``item_record``): a set never claims a type it holds only part of.

Each item also points at a small JSON document (in the same payload table) naming the groups and
filters its assignments targeted, resolved from the cached tables when the backup was taken.

Reading and retention are here too; ``backup_diff`` compares two sets, ``backup_export`` writes
one out as files, and the backup asset (``assets/backups.py``) does the Graph side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from atlas_dagster import schema
from atlas_dagster.reasons import PROVIDER_BAD_RESPONSE, GraphError, one_line
from atlas_dagster.stores import bulk
from graph_contracts import (
    Contract,
    canonical_json,
    classify,
    content_hash,
    extract_assignments,
    object_name,
)

SET_RUNNING, SET_COMPLETE, SET_PARTIAL, SET_FAILED = "running", "complete", "partial", "failed"
SET_STATUSES = (SET_RUNNING, SET_COMPLETE, SET_PARTIAL, SET_FAILED)


class BackupStoreError(Exception):
    """A request the store cannot serve (unknown set, a set with nothing to compare)."""


# --- Schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleRow:
    id: int
    key: str
    provider_connection_id: int
    policy_types: tuple[str, ...]
    retention_days: int


def _schedule(r: Any) -> ScheduleRow:
    return ScheduleRow(
        r.id, r.key, r.provider_connection_id, tuple(r.policy_types or ()), r.retention_days
    )


def find_schedule(
    engine: Engine, *, schedule_id: int | None = None, key: str | None = None
) -> ScheduleRow | None:
    bs = schema.backup_schedules
    q = sa.select(bs).where(bs.c.id == schedule_id if schedule_id is not None else bs.c.key == key)
    with engine.connect() as conn:
        r = conn.execute(q).first()
    return _schedule(r) if r else None


def schedules_of_connection(engine: Engine, conn_id: int) -> list[ScheduleRow]:
    bs = schema.backup_schedules
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(bs).where(bs.c.provider_connection_id == conn_id).order_by(bs.c.key)
        )
        return [_schedule(r) for r in rows]


# --- Items and payloads (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ItemRecord:
    """One policy of a backup, ready to store."""

    contract_key: str
    external_id: str
    policy_type: str
    display_name: str | None
    content_hash: str
    payload: str
    names_hash: str | None = None
    names: str | None = None


def assignment_names(
    obj: Mapping[str, Any], groups: Mapping[str, str], filters: Mapping[str, str]
) -> dict[str, Any] | None:
    """The object's assignment targets with their group and filter names (None: no targets)."""
    rows = []
    for a in extract_assignments(obj):
        rows.append(
            {
                **a,
                "group_name": groups.get(a["group_id"]) if a["group_id"] else None,
                "filter_name": filters.get(a["filter_id"]) if a["filter_id"] else None,
            }
        )
    if not rows:
        return None
    return {"assignments": sorted(rows, key=canonical_json)}


def item_record(
    contract: Contract,
    obj: Mapping[str, Any],
    groups: Mapping[str, str],
    filters: Mapping[str, str],
) -> ItemRecord:
    """One object as the store keeps it. An object it cannot hold raises GraphError
    (``provider_bad_response``) naming the contract and the object."""
    external_id = str(obj["id"])
    try:
        names = assignment_names(obj, groups, filters)
        names_text = canonical_json(names) if names is not None else None
        name = object_name(contract, obj)
        record = ItemRecord(
            contract_key=contract.key,
            external_id=external_id,
            policy_type=classify(contract, obj).policy_type,
            display_name=None if name is None else bulk.text_cell(name),
            content_hash=content_hash(contract, obj),
            payload=canonical_json(obj),
            names_hash=_sha256(names_text) if names_text is not None else None,
            names=names_text,
        )
    except ValueError as exc:  # text UTF-8 cannot encode (a lone surrogate)
        raise _unstorable(contract, external_id, one_line(exc)) from exc
    problem = bulk.row_problem(
        schema.backup_items, {"external_id": external_id, "policy_type": record.policy_type}
    )
    if problem is not None:
        raise _unstorable(contract, external_id, problem)
    return record


def _unstorable(contract: Contract, external_id: str, problem: str) -> GraphError:
    return GraphError(
        PROVIDER_BAD_RESPONSE,
        f"{contract.key}: object {external_id} cannot be stored ({problem}), so this type "
        "was not backed up",
        contract_key=contract.key,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- Writing ---------------------------------------------------------------------------------


@dataclass
class StoreResult:
    items: int = 0
    new_payloads: int = 0
    new_payload_bytes: int = 0


def create_set(
    engine: Engine,
    *,
    provider_connection_id: int,
    backup_schedule_id: int,
    policy_types: Sequence[str],
    operation_run_id: int | None = None,
    scheduled_for: datetime | None = None,
) -> int:
    """A new set, running: ``operation_run_id`` and ``scheduled_for`` are a run's (none for a set
    made outside one)."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                schema.backup_sets.insert().values(
                    provider_connection_id=provider_connection_id,
                    backup_schedule_id=backup_schedule_id,
                    operation_run_id=operation_run_id,
                    scheduled_for=scheduled_for,
                    created_at=schema.utcnow(),
                    item_count=0,
                    status=SET_RUNNING,
                    policy_types=list(policy_types),
                    failure_summary=[],
                )
            ).inserted_primary_key[0]
        )


def store_items(engine: Engine, set_id: int, records: Sequence[ItemRecord]) -> StoreResult:
    """Write one policy type's items and whatever payloads are new, in one transaction (so a
    payload is never visible unreferenced to retention's sweep)."""
    docs: dict[str, str] = {}
    for r in records:
        docs.setdefault(r.content_hash, r.payload)
        if r.names_hash is not None and r.names is not None:
            docs.setdefault(r.names_hash, r.names)
    result = StoreResult(items=len(records))
    p = schema.backup_payloads
    now = schema.utcnow()
    with engine.begin() as conn:
        known: set[str] = set()
        for batch in bulk.chunks(docs, 5_000):
            known.update(
                conn.execute(sa.select(p.c.content_hash).where(p.c.content_hash.in_(batch)))
                .scalars()
                .all()
            )
        new = []
        for digest, text in docs.items():
            if digest in known:
                continue
            size = len(text.encode())
            new.append({"content_hash": digest, "payload": text, "size_bytes": size})
            result.new_payloads += 1
            result.new_payload_bytes += size
        if new:
            # The first copy stored stays: a concurrent backup of the same hash changes nothing.
            bulk.upsert(conn, p, new, ("content_hash",), update=(), constants={"created_at": now})
        rows = [
            {
                "backup_set_id": set_id,
                "contract_key": r.contract_key,
                "external_id": r.external_id,
                "policy_type": r.policy_type,
                "display_name": r.display_name,
                "content_hash": r.content_hash,
                "assignment_names_hash": r.names_hash,
            }
            for r in records
        ]
        for batch in bulk.chunks(rows, 2_000):
            conn.execute(schema.backup_items.insert(), batch)
    return result


def carry_items(engine: Engine, from_set: int, to_set: int, contract_keys: Iterable[str]) -> int:
    """Copy a set's items of the given types into another set (payloads are shared)."""
    keys = list(contract_keys)
    if not keys:
        return 0
    i = schema.backup_items
    columns = [c.name for c in i.columns if c.name != "backup_set_id"]
    select = sa.select(sa.literal(to_set), *[i.c[c] for c in columns]).where(
        i.c.backup_set_id == from_set, i.c.contract_key.in_(keys)
    )
    with engine.begin() as conn:
        result = conn.execute(i.insert().from_select(["backup_set_id", *columns], select))
    return int(result.rowcount or 0)


def finish_set(engine: Engine, set_id: int, status: str, failures: list[dict[str, Any]]) -> None:
    if status not in SET_STATUSES or status == SET_RUNNING:
        raise ValueError(f"not a final backup set status: {status!r}")
    i, s = schema.backup_items, schema.backup_sets
    with engine.begin() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).where(i.c.backup_set_id == set_id)
        ).scalar_one()
        conn.execute(
            s.update()
            .where(s.c.id == set_id)
            .values(
                status=status,
                item_count=count,
                failure_summary=failures,
                completed_at=schema.utcnow(),
            )
        )


def cached_names(engine: Engine, conn_id: int) -> tuple[dict[str, str], dict[str, str]]:
    """Group names and assignment filter names of a connection, from the cached tables."""
    g, inv = schema.directory_groups, schema.inventory_items
    with engine.connect() as conn:
        groups = {
            r.group_id: r.display_name
            for r in conn.execute(
                sa.select(g.c.group_id, g.c.display_name).where(
                    g.c.provider_connection_id == conn_id, g.c.display_name.is_not(None)
                )
            )
        }
        filters = {
            r.external_id: r.display_name
            for r in conn.execute(
                sa.select(inv.c.external_id, inv.c.display_name).where(
                    inv.c.provider_connection_id == conn_id,
                    inv.c.contract_key == "assignment_filters",
                    inv.c.display_name.is_not(None),
                )
            )
        }
    return groups, filters


# --- Reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupSet:
    id: int
    provider_connection_id: int
    provider_connection: str | None
    backup_schedule_id: int | None
    backup_schedule: str | None
    operation_run_id: int | None
    scheduled_for: datetime | None
    created_at: datetime
    completed_at: datetime | None
    item_count: int
    status: str
    policy_types: list[str]
    failure_summary: list[dict[str, Any]]

    @property
    def failed_types(self) -> set[str]:
        return {f["contract_key"] for f in self.failure_summary if f.get("contract_key")}

    @property
    def covered_types(self) -> set[str]:
        """The policy types this set holds a complete copy of."""
        if self.status not in (SET_COMPLETE, SET_PARTIAL):
            return set()
        return set(self.policy_types) - self.failed_types

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        return out


def _sets_query() -> sa.Select:
    s, pc, bs = schema.backup_sets, schema.provider_connections, schema.backup_schedules
    return sa.select(
        s, pc.c.key.label("connection_key"), bs.c.key.label("schedule_key")
    ).select_from(
        s.join(pc, pc.c.id == s.c.provider_connection_id).outerjoin(
            bs, bs.c.id == s.c.backup_schedule_id
        )
    )


def _set(r: Any) -> BackupSet:
    return BackupSet(
        id=r.id,
        provider_connection_id=r.provider_connection_id,
        provider_connection=r.connection_key,
        backup_schedule_id=r.backup_schedule_id,
        backup_schedule=r.schedule_key,
        operation_run_id=r.operation_run_id,
        scheduled_for=r.scheduled_for,
        created_at=r.created_at,
        completed_at=r.completed_at,
        item_count=r.item_count,
        status=r.status,
        policy_types=list(r.policy_types or []),
        failure_summary=list(r.failure_summary or []),
    )


def get_set(engine: Engine, set_id: int) -> BackupSet | None:
    with engine.connect() as conn:
        r = conn.execute(_sets_query().where(schema.backup_sets.c.id == set_id)).first()
    return _set(r) if r else None


def require_set(engine: Engine, set_id: int) -> BackupSet:
    found = get_set(engine, set_id)
    if found is None:
        raise BackupStoreError(f"no backup set #{set_id}")
    return found


def list_sets(
    engine: Engine,
    *,
    connection: str | None = None,
    schedule: str | None = None,
    limit: int = 50,
) -> list[BackupSet]:
    """Backup sets, newest first, optionally of one connection or schedule (by key)."""
    s = schema.backup_sets
    q = _sets_query().order_by(s.c.id.desc()).limit(limit)
    if connection is not None:
        q = q.where(schema.provider_connections.c.key == connection)
    if schedule is not None:
        q = q.where(schema.backup_schedules.c.key == schedule)
    with engine.connect() as conn:
        return [_set(r) for r in conn.execute(q)]


def previous_set(engine: Engine, current: BackupSet) -> BackupSet | None:
    """The schedule's newest usable set before ``current``."""
    s = schema.backup_sets
    q = (
        _sets_query()
        .where(
            s.c.backup_schedule_id == current.backup_schedule_id,
            s.c.id < current.id,
            s.c.status.in_((SET_COMPLETE, SET_PARTIAL)),
        )
        .order_by(s.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        r = conn.execute(q).first()
    return _set(r) if r else None


@dataclass(frozen=True)
class StoredItem:
    contract_key: str
    external_id: str
    policy_type: str | None
    display_name: str | None
    content_hash: str
    assignment_names_hash: str | None


def set_items(
    engine: Engine, set_id: int, contract_keys: Iterable[str] | None = None
) -> dict[tuple[str, str], StoredItem]:
    i = schema.backup_items
    q = sa.select(
        i.c.contract_key,
        i.c.external_id,
        i.c.policy_type,
        i.c.display_name,
        i.c.content_hash,
        i.c.assignment_names_hash,
    ).where(i.c.backup_set_id == set_id)
    if contract_keys is not None:
        q = q.where(i.c.contract_key.in_(list(contract_keys)))
    with engine.connect() as conn:
        return {(r.contract_key, r.external_id): StoredItem(*r) for r in conn.execute(q)}


def load_payloads(engine: Engine, hashes: Iterable[str]) -> dict[str, str]:
    p = schema.backup_payloads
    out: dict[str, str] = {}
    with engine.connect() as conn:
        for batch in bulk.chunks(set(hashes), 2_000):
            for r in conn.execute(
                sa.select(p.c.content_hash, p.c.payload).where(p.c.content_hash.in_(batch))
            ):
                out[r.content_hash] = r.payload
    return out


# --- Retention ---------------------------------------------------------------------------------


@dataclass
class RetentionResult:
    deleted_sets: list[int] = field(default_factory=list)
    deleted_payloads: int = 0


def apply_retention(
    engine: Engine, schedule_id: int, retention_days: int, *, now: datetime | None = None
) -> RetentionResult:
    """Delete the schedule's sets older than ``retention_days`` — never its newest complete set —
    then every payload no remaining item references."""
    cutoff = (now or schema.utcnow()) - timedelta(days=retention_days)
    s, i = schema.backup_sets, schema.backup_items
    result = RetentionResult()
    with engine.begin() as conn:
        keep = conn.execute(
            sa.select(sa.func.max(s.c.id)).where(
                s.c.backup_schedule_id == schedule_id, s.c.status == SET_COMPLETE
            )
        ).scalar()
        q = sa.select(s.c.id).where(s.c.backup_schedule_id == schedule_id, s.c.created_at < cutoff)
        if keep is not None:
            q = q.where(s.c.id != keep)
        result.deleted_sets = sorted(conn.execute(q).scalars().all())
        for batch in bulk.chunks(result.deleted_sets, 1_000):
            conn.execute(i.delete().where(i.c.backup_set_id.in_(batch)))
            conn.execute(s.delete().where(s.c.id.in_(batch)))
    if result.deleted_sets:
        result.deleted_payloads = sweep_payloads(engine)
    return result


def sweep_payloads(engine: Engine) -> int:
    """Delete payloads no item references. Items and their new payloads commit together, so an
    unreferenced payload is garbage; a writer that starts referencing one concurrently makes the
    delete fail on the foreign key, and that payload waits for the next sweep."""
    p, i = schema.backup_payloads, schema.backup_items
    orphan = sa.and_(
        ~sa.exists().where(i.c.content_hash == p.c.content_hash),
        ~sa.exists().where(i.c.assignment_names_hash == p.c.content_hash),
    )
    with engine.connect() as conn:
        doomed = conn.execute(sa.select(p.c.content_hash).where(orphan)).scalars().all()
    deleted = 0
    for batch in bulk.chunks(doomed, 1_000):
        try:
            with engine.begin() as conn:
                result = conn.execute(p.delete().where(p.c.content_hash.in_(batch), orphan))
            deleted += int(result.rowcount or 0)
        except IntegrityError:
            continue
    return deleted
