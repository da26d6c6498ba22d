"""Bulk writes that work the same on SQLite and PostgreSQL: multi-row upserts, chunked updates.

PostgreSQL's ``text`` and ``jsonb`` cannot hold U+0000 (SQLite can), and Graph may return it.
So that both backends store the same thing, every write through this module stores:

- in a text column people read (names, types) U+2400 SYMBOL FOR NULL (``␀``) in place of each
  NUL — lossy, and readable;
- in a JSON column every string (keys included) escaped reversibly: ``␀`` is written ``␀␀`` and
  NUL ``␀0``. ``decode_json`` undoes it on read. A document holding neither character (nearly
  every one) is stored as it is;
- in a key column the value as given: a caller screens rows with ``row_problem`` first.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from atlas_dagster.schema import UTCDateTime

_ROWS_PER_CALL = 10_000


NUL, ESCAPE = "\x00", "\u2400"
_NUL_IN_JSON = "\\u0000"  # how the JSON encoder writes a NUL
_ESCAPED = re.compile(ESCAPE + "(.?)", re.DOTALL)
_UNESCAPE = {ESCAPE: ESCAPE, "0": NUL}


def text_cell(value: str) -> str:
    """A string for a text column people read: each NUL shown as ``␀``."""
    return value.replace(NUL, ESCAPE) if NUL in value else value


def _escape(text: str) -> str:
    if NUL not in text and ESCAPE not in text:
        return text
    return text.replace(ESCAPE, ESCAPE + ESCAPE).replace(NUL, ESCAPE + "0")


def _unescape(text: str) -> str:
    if ESCAPE not in text:
        return text

    def one(match: re.Match[str]) -> str:
        try:
            return _UNESCAPE[match.group(1)]
        except KeyError:
            raise ValueError(f"not an escaped JSON string: {text!r}") from None

    return _ESCAPED.sub(one, text)


def _strings(value: Any, convert: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return convert(value)
    if isinstance(value, dict):
        return {convert(k): _strings(v, convert) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v, convert) for v in value]
    return value


def encode_json(value: Any) -> Any:
    """A JSON value as a JSON column stores it (see the module docstring)."""
    return _strings(value, _escape)


def decode_json(value: Any) -> Any:
    """A JSON column's value exactly as it was written: undoes ``encode_json``."""
    return _strings(value, _unescape)


def _plain(doc: str) -> bool:
    """The JSON text of a value that ``encode_json`` leaves unchanged (a false positive only
    costs an escape pass that changes nothing)."""
    return ESCAPE not in doc and _NUL_IN_JSON not in doc


def row_problem(table: sa.Table, row: Mapping[str, Any]) -> str | None:
    """Why ``row`` cannot be stored alike on both backends, or None: a NUL in a key column
    (which must not be altered), or a string longer than its column (PostgreSQL refuses it,
    SQLite would keep it)."""
    for name, value in row.items():
        column_type = table.c[name].type
        if not isinstance(value, str) or not isinstance(column_type, sa.String):
            continue
        if NUL in value and table.c[name].primary_key:
            return f"{name} contains U+0000"
        if column_type.length is not None and len(value) > column_type.length:
            return f"{name} is longer than {column_type.length} characters"
    return None


def storable_rows(
    table: sa.Table, rows: Iterable[dict[str, Any]], keep: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Rows with their text and JSON values as both backends store them (see the module
    docstring). Key columns, and the columns in ``keep``, are left as given; so is a row with
    nothing to change (the same dict)."""
    rows = list(rows)
    columns = {c for row in rows for c in row}
    text = [c for c in columns if _is_text(table.c[c], keep)]
    documents = [c for c in columns if _is_json(table.c[c])]
    out = []
    for row in rows:
        changes = {c: text_cell(v) for c in text if (v := row.get(c)) is not None and NUL in v} | {
            c: encode_json(v)
            for c in documents
            if (v := row.get(c)) is not None and not _plain(_json(v))
        }
        out.append({**row, **changes} if changes else row)
    return out


def _is_json(column: sa.Column) -> bool:
    return isinstance(column.type, sa.JSON)


def _is_text(column: sa.Column, keep: Iterable[str]) -> bool:
    return isinstance(column.type, sa.String) and not column.primary_key and column.name not in keep


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
    constants: Mapping[str, Any] | None = None,
) -> None:
    """INSERT … ON CONFLICT (key) DO UPDATE, in bulk (PostgreSQL: COPY; SQLite: executemany)."""
    prepare_upsert(conn.dialect.name, table, rows, key, update=update, constants=constants).execute(
        conn
    )


@dataclass
class PreparedUpsert:
    """A bulk upsert with its rows already formatted for the database: ``execute`` only talks
    to the database, so a writer can format the next batch while this one is written."""

    dialect: str
    table: sa.Table
    key: tuple[str, ...]
    constants: dict[str, Any]
    # Per set of columns: (columns the rows carry, columns to update, formatted rows).
    parts: list[tuple[tuple[str, ...], list[str], Any]] = field(default_factory=list)

    def execute(self, conn: Connection) -> None:
        if conn.dialect.name != self.dialect:
            raise ValueError(f"prepared for {self.dialect}, executed on {conn.dialect.name}")
        for varying, targets, payload in self.parts:
            if self.dialect == "postgresql":
                self._copy(conn, varying, targets, payload)
            else:
                self._executemany(conn, targets, payload)

    def _executemany(self, conn, targets, rows) -> None:
        # One compiled statement, executed many times: sqlite3 loops in C.
        stmt = sqlite.insert(self.table)
        if targets:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(self.key),
                set_={c: getattr(stmt.excluded, c) for c in targets},
            )
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(self.key))
        conn.execute(stmt, rows)

    def _copy(self, conn, varying, targets, stream: io.StringIO) -> None:
        """COPY the rows into a scratch table, then one INSERT … SELECT … ON CONFLICT.

        psycopg2's executemany is a round trip per row; COPY streams them in one."""
        table, constants = self.table, self.constants
        scratch = f"_atlas_bulk_{table.name}"
        selected = [f'"{c}"' for c in varying] + [
            f"CAST(%({c})s AS {table.c[c].type.compile(conn.dialect)})" for c in constants
        ]
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
                f'COPY "{scratch}" ({", ".join(selected[: len(varying)])}) FROM STDIN '
                f"WITH (FORMAT csv, NULL '{_NULL}')",
                stream,
            )
            names = ", ".join(f'"{c}"' for c in (*varying, *constants))
            cursor.execute(
                f'INSERT INTO "{table.name}" ({names}) '
                f'SELECT {", ".join(selected)} FROM "{scratch}" '
                f"ON CONFLICT ({', '.join(self.key)}) {action}",
                {c: _cell(table.c[c], v) for c, v in constants.items()},
            )
        finally:
            cursor.close()


def prepare_upsert(
    dialect: str,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    key: Sequence[str],
    *,
    update: Sequence[str] | None = None,
    constants: Mapping[str, Any] | None = None,
) -> PreparedUpsert:
    """Format rows for an upsert on ``dialect`` ("postgresql" or "sqlite") without a connection.

    Rows are grouped by the set of columns they carry, so a partial row (a delta page that names
    only changed properties) updates only the columns it has. ``constants`` are columns with one
    value for every row (the connection, the sync's timestamps): PostgreSQL gets them once per
    statement instead of once per row.
    """
    [stored_constants] = storable_rows(table, [dict(constants or {})], keep=key)
    prepared = PreparedUpsert(dialect, table, tuple(key), stored_constants)
    constants = prepared.constants
    varying_key = [k for k in key if k not in constants]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    for varying, group in groups.items():
        if constants.keys() & set(varying):
            raise ValueError(
                f"rows carry constant columns: {sorted(constants.keys() & set(varying))}"
            )
        columns = (*varying, *constants)
        targets = [c for c in (update if update is not None else columns) if c in columns]
        targets = [c for c in targets if c not in key]
        # ON CONFLICT may not touch one row twice in a statement: the last sight of a key wins.
        identity = itemgetter(*varying_key) if varying_key else (lambda row: ())
        unique = list({identity(row): row for row in group}.values())
        for batch in chunks(unique, _ROWS_PER_CALL):
            payload = (
                _csv(table, varying, key, batch)
                if dialect == "postgresql"
                else [{**row, **constants} for row in storable_rows(table, batch, keep=key)]
            )
            prepared.parts.append((varying, targets, payload))
    return prepared


class _Null(float):
    """NULL in the COPY stream. The writer quotes every string (QUOTE_NONNUMERIC) and leaves
    numbers bare; this "number" prints as the NULL marker, so it is the only bare marker in the
    stream, and a real string spelled like the marker arrives quoted, as a string."""

    def __str__(self) -> str:
        return "\\N"

    __repr__ = __str__  # some csv versions print floats by repr


_NULL = str(_Null())
_NULL_CELL = _Null()
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _csv(
    table: sa.Table, columns: Sequence[str], key: Sequence[str], batch: Sequence[dict[str, Any]]
) -> io.StringIO:
    """The rows as PostgreSQL CSV, stored as ``storable_rows`` would. This runs for every cached
    row, so it works a column at a time (list comprehensions, no call per cell) and leaves the
    rows to the C csv writer."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerows(
        zip(
            *(_cells(table.c[c], [row[c] for row in batch], key) for c in columns),
            strict=True,
        )
    )
    buffer.seek(0)
    return buffer


def _cells(column: sa.Column, values: list[Any], key: Sequence[str]) -> list[Any]:
    if _is_json(column):
        encode = _json_memo()
        docs = [None if v is None else encode(v) for v in values]
        return [
            _NULL_CELL
            if d is None
            else d
            if ESCAPE not in d and _NUL_IN_JSON not in d  # _plain, inlined: no call per cell
            else _json(encode_json(v))
            for d, v in zip(docs, values, strict=True)
        ]
    if isinstance(column.type, sa.DateTime | UTCDateTime):
        # A batch shares its sync's timestamps: format each once.
        stamps: dict[Any, str] = {}
        return [
            _NULL_CELL if v is None else (stamps.get(v) or stamps.setdefault(v, v.isoformat()))
            for v in values
        ]
    if _is_text(column, key):
        return [_NULL_CELL if v is None else v if NUL not in v else text_cell(v) for v in values]
    return [_NULL_CELL if v is None else v for v in values]


def _json_memo() -> Callable[[Any], str]:
    """JSON encoding that remembers small lists: a batch's lists repeat a few shapes (a group's
    groupTypes). For JSON's types, equal repr means equal JSON."""
    docs: dict[str, str] = {}

    def encode(value: Any) -> str:
        if isinstance(value, dict):
            return _json(value)  # payloads: large and unique, not worth a repr
        key = repr(value)
        doc = docs.get(key)
        if doc is None:
            doc = _json(value)
            if len(key) <= 256:
                docs[key] = doc
        return doc

    return encode


def _cell(column: sa.Column, value: Any) -> Any:
    """A constant as a statement parameter (JSON columns take text)."""
    return _json(value) if value is not None and _is_json(column) else value


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
