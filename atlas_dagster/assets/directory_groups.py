"""The ``directory_groups`` asset: Entra ID groups, kept current by delta queries.

The first sync pages through every group and stores the delta link; later syncs apply only the
changes (``@removed`` → ``deleted_at``). An expired delta token falls back to a full resync, which
reconciles deletions by what the full listing no longer holds. The delta link is stored only after
a sync completes, so a failed sync is simply repeated.
"""

import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import bulk, schema
from atlas_dagster.assets.common import (
    active_rows,
    connection_for_run,
    freshness_result,
    graph_counts,
    int_metadata,
    markdown_table,
    parse_graph_datetime,
)
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.ledger.job import OperationHandle, operation_scope
from atlas_dagster.readiness import record_denied
from atlas_dagster.reasons import DeltaExpired, GraphError
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource

CONTRACT_KEY = "groups_delta"
# Directory delta tokens are honoured for 7 days; an older one is not even tried.
DELTA_LINK_LIFETIME = timedelta(days=7)
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


@dataclass
class GroupsResult:
    mode: str  # "full", "incremental", "resync"
    upserted: int = 0
    created: int = 0
    removed: int = 0
    active: int = 0  # active groups after the sync
    pages: int = 0
    duration_s: float = 0.0
    graph: dict[str, int] | None = None


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
    database, which bounds memory."""

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

    def close(self) -> None:
        self._formatter.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)

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


def _store_delta_link(engine: Engine, conn_id: int, link: str) -> None:
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


def _read(engine: Engine, client: Any, conn_id: int, link: str | None, mode: str) -> GroupsResult:
    now = schema.utcnow()
    writer = GroupsWriter(engine, conn_id, now)
    result = GroupsResult(mode)
    final_link = None
    try:
        with _PROMPT_SWITCHES:
            for page in client.delta(CONTRACT_KEY, link):
                result.pages += 1
                writer.add(page.items, page.removed)
                if page.delta_link:
                    final_link = page.delta_link
            writer.flush()
    finally:
        writer.close()
    if final_link is None:
        raise GraphError(
            "provider_bad_response",
            "the groups delta ended without an @odata.deltaLink",
            contract_key=CONTRACT_KEY,
        )
    if link is None:
        writer.reconcile_full()
    _store_delta_link(engine, conn_id, final_link)
    result.upserted, result.removed = writer.result_upserted, writer.result_removed
    result.active = active_rows(engine, schema.directory_groups, conn_id)
    # Every active group now is one that was active before, or a new (or restored) one.
    result.created = result.active - writer.active_before + result.removed
    return result


def run_groups_sync(engine: Engine, client: Any, conn_id: int, log: Any = None) -> GroupsResult:
    started = time.monotonic()
    before = client.stats.as_dict()
    stored = stored_delta_link(engine, conn_id)
    try:
        if stored is None:
            result = _read(engine, client, conn_id, None, "full")
        elif stored[1] < schema.utcnow() - DELTA_LINK_LIFETIME:
            raise DeltaExpired(
                "provider_not_found",
                f"the stored delta link is older than {DELTA_LINK_LIFETIME.days} days",
                contract_key=CONTRACT_KEY,
            )
        else:
            result = _read(engine, client, conn_id, stored[0], "incremental")
    except DeltaExpired as exc:
        if log is not None:
            log.info(f"{exc}: full resync")
        result = _read(engine, client, conn_id, None, "resync")
    result.graph = client.stats.since(before)
    result.duration_s = time.monotonic() - started
    return result


def _summary(result: GroupsResult, handle: OperationHandle) -> None:
    handle.progress(
        groups_upserted=result.upserted,
        groups_created=result.created,
        groups_removed=result.removed,
        **graph_counts(result.graph or {}),
    )


@dg.asset(
    name="directory_groups",
    partitions_def=provider_connection_partitions,
    group_name="tenant_cache",
    description="The tenant's Entra ID groups, kept current by delta queries (table directory_groups).",
    check_specs=[
        dg.AssetCheckSpec(
            "non_empty",
            asset="directory_groups",
            description="The tenant's cached groups are not empty.",
        ),
    ],
    kinds={"python", "sql"},
)
def directory_groups(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
):
    with operation_scope(context, ledger) as handle:
        connection, conn_id = connection_for_run(database, context.partition_key)
        engine = handle.fenced(database.engine())
        try:
            result = run_groups_sync(engine, graph.client(connection), conn_id, context.log)
        except GraphError as exc:
            record_denied(engine, conn_id, exc, handle.id)
            raise
        _summary(result, handle)
        active = result.active
        yield dg.MaterializeResult(
            metadata={
                "mode": dg.MetadataValue.text(result.mode),
                "groups_active": dg.MetadataValue.int(active),
                "groups_upserted": dg.MetadataValue.int(result.upserted),
                "groups_created": dg.MetadataValue.int(result.created),
                "groups_removed": dg.MetadataValue.int(result.removed),
                "delta_pages": dg.MetadataValue.int(result.pages),
                "duration_s": dg.MetadataValue.float(round(result.duration_s, 3)),
                "operation_run_id": dg.MetadataValue.int(handle.id),
                **int_metadata(graph_counts(result.graph or {})),
                "changes": dg.MetadataValue.md(
                    markdown_table(
                        ("mode", "created", "changed or seen", "removed"),
                        [
                            (
                                result.mode,
                                result.created,
                                result.upserted - result.created,
                                result.removed,
                            )
                        ],
                        empty="",
                    )
                ),
            }
        )
        yield dg.AssetCheckResult(
            check_name="non_empty",
            passed=active > 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"groups_active": dg.MetadataValue.int(active)},
        )


@dg.asset_check(
    asset=directory_groups,
    name="fresh",
    description="Every configured connection's groups were refreshed in the last 26 hours.",
)
def directory_groups_fresh(database: DatabaseResource) -> dg.AssetCheckResult:
    return freshness_result(database, schema.directory_delta_links.c.updated_at)


directory_groups_sync_job = dg.define_asset_job(
    "directory_groups_sync_job",
    selection=dg.AssetSelection.assets(directory_groups),
    description="Run type directory_groups.sync: apply the groups delta of one provider connection.",
)
