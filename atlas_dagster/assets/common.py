"""Helpers the tenant assets share: the run's connection, the log a sync reports to, metadata
rendering, freshness."""

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import dagster as dg
import sqlalchemy as sa

from atlas_dagster.config import ProviderConnection
from atlas_dagster.db import connection_ids
from atlas_dagster.reasons import PROVIDER_CONNECTION_MISSING, AtlasError
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.stores.cache import latest_refresh

# A daily refresh that ran a little late is still fresh.
FRESHNESS_WINDOW = timedelta(hours=26)


class Log(Protocol):
    """Where a sync reports each step: the asset's ``context.log``, or a ``logging.Logger``."""

    def info(self, msg: str, /) -> object: ...


class Progress:
    """Per-type lines of a sync, sent to ``log`` in batches: a line as soon as a second has
    passed since the last one, the rest when the sync ends. Every line reaches the log, but a
    Dagster run stores each log call as an event (milliseconds each), so a fast sync of 28
    types writes one or two events instead of 28 while a slow one still shows progress."""

    def __init__(self, log: Log | None, every_s: float = 1.0):
        self.log, self.every_s = log, every_s
        self.pending: list[str] = []
        self.last = time.monotonic()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def add(self, line: str) -> None:
        if self.log is None:
            return
        self.pending.append(line)
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.log is not None and self.pending:
            self.log.info("\n".join(self.pending))
            self.pending.clear()
        self.last = time.monotonic()


def connection_for_run(database: DatabaseResource, key: str) -> tuple[ProviderConnection, int]:
    """The configured connection of a partition, and its database id."""
    try:
        connection = database.config().connection(key)
    except KeyError:
        raise AtlasError(
            PROVIDER_CONNECTION_MISSING,
            f"provider connection {key!r} is not in the config ({database.config().source})",
        ) from None
    return connection, connection_ids(database.engine())[key]


def graph_counts(graph: Mapping[str, int]) -> dict[str, int]:
    """A run's Graph traffic, under the names its ledger counts and its materialisation share
    (one name per count, so the UI never shows the same number twice)."""
    return {
        "graph_requests": graph.get("requests", 0),
        "graph_request_units": graph.get("request_units", 0),
        "graph_throttled_retries": graph.get("throttled_retries", 0),
    }


def int_metadata(counts: Mapping[str, int]) -> dict[str, dg.IntMetadataValue]:
    return {key: dg.MetadataValue.int(value) for key, value in counts.items()}


def table_metadata(
    columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]
) -> dg.TableMetadataValue:
    """Rows as a table value, which the Dagster UI renders as a table it can sort (a JSON or
    markdown string it shows as text). ``columns`` are (name, Dagster column type) pairs."""
    names = [name for name, _ in columns]
    return dg.MetadataValue.table(
        records=[dg.TableRecord(dict(zip(names, row, strict=True))) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns]),
    )


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str, limit: int = 30
) -> str:
    if not rows:
        return empty
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows[:limit]:
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    if len(rows) > limit:
        lines.append(f"\n… and {len(rows) - limit} more")
    return "\n".join(lines)


def freshness_result(
    database: DatabaseResource, stamp: sa.ColumnElement, window: timedelta = FRESHNESS_WINDOW
) -> dg.AssetCheckResult:
    """Whether every configured connection's cache was refreshed within ``window``, judged by
    ``stamp`` (a timestamp column that carries ``provider_connection_id``; read from the
    database only)."""
    engine = database.engine()
    ids = connection_ids(engine)
    keys = [c.key for c in database.config().provider_connections]
    latest = latest_refresh(engine, stamp)
    now = datetime.now(UTC)
    ages: dict[str, float | None] = {}
    for key in keys:
        when = latest.get(ids.get(key))
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ages[key] = None if when is None else round((now - when).total_seconds() / 3600, 2)
    stale = [k for k, age in ages.items() if age is None or age > window.total_seconds() / 3600]
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "hours_since_refresh": dg.MetadataValue.json(ages),
            "stale_connections": dg.MetadataValue.json(stale),
        },
        description=f"stale: {', '.join(stale)}" if stale else None,
    )
