"""Bulk writes that work the same on SQLite and PostgreSQL: multi-row upserts, chunked updates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

# SQLite allows 32,766 bound parameters per statement; PostgreSQL 65,535.
_MAX_PARAMS = 30_000


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def upsert(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    key: Sequence[str],
    *,
    update: Sequence[str] | None = None,
) -> None:
    """INSERT … ON CONFLICT (key) DO UPDATE, as multi-row statements.

    Rows are grouped by the set of columns they carry, so a partial row (a delta page that names
    only changed properties) updates only the columns it has.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    for columns, group in groups.items():
        per_statement = max(1, _MAX_PARAMS // max(1, len(columns)))
        targets = [c for c in (update if update is not None else columns) if c in columns]
        targets = [c for c in targets if c not in key]
        for batch in chunks(group, per_statement):
            stmt = insert(table).values(batch)
            if targets:
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(key),
                    set_={c: getattr(stmt.excluded, c) for c in targets},
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
            conn.execute(stmt)


def update_where_in(
    conn: Connection,
    table: sa.Table,
    column: sa.Column,
    values: Iterable[Any],
    where: Any,
    **changes: Any,
) -> int:
    """UPDATE table SET changes WHERE where AND column IN (values), chunked."""
    total = 0
    for batch in chunks(values, 5_000):
        result = conn.execute(table.update().where(where, column.in_(batch)).values(**changes))
        total += result.rowcount
    return total
