"""The groups cache (``directory_groups``) and its delta link (``directory_delta_links``).

Delta pages are written as they are read, in batches, beside the reading thread. The delta link
is a separate write, which the sync makes only once its pages are all stored.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.stores import bulk
from atlas_dagster.stores.cache import active_rows, parse_graph_datetime

CONTRACT_KEY = "groups_delta"
FLUSH_ROWS = 10_000

# Graph property → column. Only properties present in an object are written: a delta page may
# name only what changed, and a group split across pages repeats just id and members@delta.
_FIELDS = {
    "displayName": "display_name",
    "mail": "mail",
    "mailNickname": "mail_nickname",
    "securityEnabled": "security_enabled",
    "mailEnabled": "mail_enabled",
    "groupTypes": "group_types",
    "membershipRule": "membership_rule",
    "createdDateTime": "created_at",
}


def group_row(obj: dict[str, Any]) -> dict[str, Any]:
    """The directory_groups columns an object carries, beside the connection and the sync's
    timestamps, which are the same for every row (pure)."""
    row = {"group_id": str(obj["id"])}
    row.update({column: obj[prop] for prop, column in _FIELDS.items() if prop in obj})
    if "created_at" in row:
        row["created_at"] = parse_graph_datetime(row["created_at"])
    return row


# Delta pages as read: each page's objects and its @removed entries.
Pages = list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def merge_pages(pages: Pages) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Rows to upsert and ids to mark deleted from consecutive delta pages, in order: a later
    sight of a group completes or replaces an earlier one, ``@removed`` drops it (pure)."""
    rows: dict[str, dict[str, Any]] = {}
    removed: set[str] = set()
    for items, gone in pages:
        for obj in items:
            if obj.get("id") is None:
                continue
            row = group_row(obj)
            gid = row["group_id"]
            removed.discard(gid)
            previous = rows.get(gid)
            # The same object split across pages repeats its id with the rest of it.
            rows[gid] = {**previous, **row} if previous else row
        for obj in gone:
            if obj.get("id") is not None:
                gid = str(obj["id"])
                rows.pop(gid, None)
                removed.add(gid)
    return rows, removed


class _SwitchInterval:
    """While a groups sync runs, threads take turns with the GIL every 0.5 ms instead of 5 ms.

    The reading thread spends its time waiting for Graph; when a page arrives it must get the
    GIL back from the formatting thread before it can ask for the next page, and
    with the default interval that wait, up to 5 ms, was paid on most of the 1,000 pages of a
    large tenant. Counted, so concurrent syncs in one process restore the default only when the
    last one ends."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._users = 0
        self._default = 0.0  # the interval to restore, read when the first sync starts

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._default = sys.getswitchinterval()
                sys.setswitchinterval(min(self.seconds, self._default))
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._default)


_PROMPT_SWITCHES = _SwitchInterval(0.0005)


class GroupsWriter:
    """Takes delta pages as they are read and writes them in batches, in a pipeline beside the
    reading thread: one thread formats a batch (rows, the COPY stream) while another writes the
    batch before it. Batches are written in order (a later sight of a group wins), each in its
    own transaction; the reader waits rather than run more than two batches ahead of the
    database, which bounds memory.

    Read the pages inside ``with writer:``: that is when the pipeline's threads compete with
    the reader for the GIL (see ``_SwitchInterval``); leaving it stops them."""

    def __init__(self, engine: Engine, conn_id: int, now: datetime):
        self.engine, self.conn_id, self.now = engine, conn_id, now
        self._pages: Pages = []
        self._queued = 0
        self.result_upserted = 0
        self.result_removed = 0
        self.active_before = active_rows(engine, schema.directory_groups, conn_id)
        self._formatter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="groups-format")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="groups-write")
        self._formatting: Future | None = None  # → the Future of that batch's write
        self._writing: Future | None = None
        self._failed = threading.Event()  # no batch is written after one that failed

    def __enter__(self) -> GroupsWriter:
        _PROMPT_SWITCHES.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            _PROMPT_SWITCHES.__exit__(*exc)
        finally:
            self._formatter.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True, cancel_futures=True)

    def add(self, items: list[dict[str, Any]], removed: list[dict[str, Any]]) -> None:
        self._pages.append((items, removed))
        self._queued += len(items) + len(removed)
        if self._queued >= FLUSH_ROWS:
            self._submit()

    def flush(self) -> None:
        """Write everything added so far, and wait for it."""
        self._submit()
        self._settle()
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _submit(self) -> None:
        self._settle()  # surfaces the previous batches' errors before queueing another
        if self._pages:
            pages, self._pages, self._queued = self._pages, [], 0
            self._formatting = self._formatter.submit(self._format, pages)

    def _settle(self) -> None:
        """Wait for the batch being formatted to reach the writer, and for the write before it."""
        if self._formatting is not None:
            formatting, self._formatting = self._formatting, None
            writing = formatting.result()
            if self._writing is not None:
                self._writing.result()
            self._writing = writing

    def _format(self, pages: Pages) -> Future:
        rows, removed = merge_pages(pages)
        t = schema.directory_groups
        prepared = bulk.prepare_upsert(
            self.engine.dialect.name,
            t,
            list(rows.values()),
            ("provider_connection_id", "group_id"),
            update=[c.name for c in t.c if c.name != "first_seen_at"],
            constants={
                "provider_connection_id": self.conn_id,
                "first_seen_at": self.now,
                "last_seen_at": self.now,
                "deleted_at": None,
            },
        )
        return self._writer.submit(self._write, prepared, len(rows), removed)

    def _write(self, prepared: bulk.PreparedUpsert, upserted: int, removed: set[str]) -> None:
        if self._failed.is_set():
            raise RuntimeError("an earlier batch of this groups sync failed to write")
        t = schema.directory_groups
        try:
            with self.engine.begin() as conn:
                prepared.execute(conn)
                if removed:
                    self.result_removed += bulk.update_where_in(
                        conn,
                        t,
                        t.c.group_id,
                        removed,
                        sa.and_(
                            t.c.provider_connection_id == self.conn_id, t.c.deleted_at.is_(None)
                        ),
                        deleted_at=self.now,
                    )
        except BaseException:
            self._failed.set()
            raise
        self.result_upserted += upserted

    def reconcile_full(self) -> int:
        """After a complete full listing: whatever it did not hold is gone."""
        t = schema.directory_groups
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(
                    t.c.provider_connection_id == self.conn_id,
                    t.c.deleted_at.is_(None),
                    t.c.last_seen_at < self.now,
                )
                .values(deleted_at=self.now)
            )
        self.result_removed += result.rowcount
        return result.rowcount


def stored_delta_link(engine: Engine, conn_id: int) -> tuple[str, datetime] | None:
    t = schema.directory_delta_links
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(t.c.delta_link, t.c.updated_at).where(
                t.c.provider_connection_id == conn_id, t.c.contract_key == CONTRACT_KEY
            )
        ).first()
    return None if row is None else (row.delta_link, row.updated_at)


def store_delta_link(engine: Engine, conn_id: int, link: str) -> None:
    with engine.begin() as conn:
        bulk.upsert(
            conn,
            schema.directory_delta_links,
            [
                {
                    "provider_connection_id": conn_id,
                    "contract_key": CONTRACT_KEY,
                    "delta_link": link,
                    "updated_at": schema.utcnow(),
                }
            ],
            ("provider_connection_id", "contract_key"),
        )
