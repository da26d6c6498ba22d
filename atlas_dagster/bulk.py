"""Bulk writes that work the same on SQLite and PostgreSQL: multi-row upserts, chunked updates."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from atlas_dagster.schema import UTCDateTime

_ROWS_PER_CALL = 10_000


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
    """INSERT … ON CONFLICT (key) DO UPDATE, in bulk (PostgreSQL: COPY; SQLite: executemany).

    Rows are grouped by the set of columns they carry, so a partial row (a delta page that names
    only changed properties) updates only the columns it has.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    for columns, group in groups.items():
        targets = [c for c in (update if update is not None else columns) if c in columns]
        targets = [c for c in targets if c not in key]
        # ON CONFLICT may not touch one row twice in a statement: the last sight of a key wins.
        unique = list({tuple(row[k] for k in key): row for row in group}.values())
        for batch in chunks(unique, _ROWS_PER_CALL):
            if conn.dialect.name == "postgresql":
                _copy_upsert(conn, table, columns, batch, key, targets)
            else:
                _sqlite_upsert(conn, table, batch, key, targets)


def _sqlite_upsert(conn, table, batch, key, targets) -> None:
    # One compiled statement, executed many times: sqlite3 loops in C.
    stmt = sqlite.insert(table)
    if targets:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_={c: getattr(stmt.excluded, c) for c in targets}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
    conn.execute(stmt, batch)


def _copy_upsert(conn, table, columns, batch, key, targets) -> None:
    """COPY the rows into a scratch table, then one INSERT … SELECT … ON CONFLICT.

    psycopg2's executemany is a round trip per row; COPY streams them in one."""
    cols = ", ".join(f'"{c}"' for c in columns)
    scratch = f"_atlas_bulk_{table.name}"
    action = (
        "DO UPDATE SET " + ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in targets)
        if targets
        else "DO NOTHING"
    )
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{scratch}" ON COMMIT DELETE ROWS AS '
            f'SELECT * FROM "{table.name}" WITH NO DATA'
        )
        cursor.execute(f'TRUNCATE "{scratch}"')
        cursor.copy_expert(
            f"COPY \"{scratch}\" ({cols}) FROM STDIN WITH (FORMAT csv, NULL '{_NULL}')",
            _csv(table, columns, batch),
        )
        cursor.execute(
            f'INSERT INTO "{table.name}" ({cols}) SELECT {cols} FROM "{scratch}" '
            f"ON CONFLICT ({', '.join(key)}) {action}"
        )
    finally:
        cursor.close()


# NULL in the COPY stream. The csv module leaves it unquoted, which is what makes it NULL; a real
# value spelled exactly like it would be read as NULL too, so such rows are quoted by hand.
_NULL = "\\N"


def _csv(table: sa.Table, columns: Sequence[str], batch: Sequence[dict[str, Any]]) -> io.StringIO:
    """The rows as PostgreSQL CSV, written by the C csv writer (this runs for every cached row)."""
    as_json = {c for c in columns if isinstance(table.c[c].type, sa.JSON)}
    as_time = {c for c in columns if isinstance(table.c[c].type, sa.DateTime | UTCDateTime)}
    # A batch shares its sync's timestamps: format each once.
    stamps: dict[Any, str] = {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in batch:
        cells = [
            _NULL
            if (value := row[c]) is None
            else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            if c in as_json
            else (stamps.get(value) or stamps.setdefault(value, value.isoformat()))
            if c in as_time
            else value
            for c in columns
        ]
        if _NULL in cells and any(row[c] == _NULL for c in columns):
            buffer.write(",".join(_quoted(row[c], c in as_json) for c in columns) + "\n")
        else:
            writer.writerow(cells)
    buffer.seek(0)
    return buffer


def _quoted(value: Any, as_json: bool) -> str:
    if value is None:
        return _NULL
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False) if as_json else str(value)
    return '"' + text.replace('"', '""') + '"'


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
