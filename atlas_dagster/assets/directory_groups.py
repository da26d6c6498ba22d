"""The ``directory_groups`` asset: Entra ID groups, kept current by delta queries.

The first sync pages through every group and stores the delta link; later syncs apply only the
changes (``@removed`` → ``deleted_at``). An expired delta token falls back to a full resync, which
reconciles deletions by what the full listing no longer holds. The delta link is stored only after
a sync completes, so a failed sync is simply repeated.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import dagster as dg
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.assets.common import (
    Log,
    connection_for_run,
    freshness_result,
    graph_counts,
    int_metadata,
    markdown_table,
)
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.graph import DeltaPage, GraphStats
from atlas_dagster.ledger.job import OperationHandle, operation_scope
from atlas_dagster.reasons import DeltaExpired, GraphError
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.stores.cache import active_rows
from atlas_dagster.stores.checks import record_denied
from atlas_dagster.stores.groups import (
    CONTRACT_KEY,
    GroupsWriter,
    store_delta_link,
    stored_delta_link,
)

# Directory delta tokens are honoured for 7 days; an older one is not even tried.
DELTA_LINK_LIFETIME = timedelta(days=7)


class DeltaReader(Protocol):
    """What a groups sync needs of its Graph client: delta rounds, and the traffic counters
    its result reports."""

    stats: GraphStats

    def delta(self, contract_key: str, delta_link: str | None) -> Iterator[DeltaPage]: ...


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


def _read(
    engine: Engine, client: DeltaReader, conn_id: int, link: str | None, mode: str
) -> GroupsResult:
    now = schema.utcnow()
    result = GroupsResult(mode)
    final_link = None
    with GroupsWriter(engine, conn_id, now) as writer:
        for page in client.delta(CONTRACT_KEY, link):
            result.pages += 1
            writer.add(page.items, page.removed)
            if page.delta_link:
                final_link = page.delta_link
        writer.flush()
    if final_link is None:
        raise GraphError(
            "provider_bad_response",
            "the groups delta ended without an @odata.deltaLink",
            contract_key=CONTRACT_KEY,
        )
    if link is None:
        writer.reconcile_full()
    store_delta_link(engine, conn_id, final_link)
    result.upserted, result.removed = writer.result_upserted, writer.result_removed
    result.active = active_rows(engine, schema.directory_groups, conn_id)
    # Every active group now is one that was active before, or a new (or restored) one.
    result.created = result.active - writer.active_before + result.removed
    return result


def run_groups_sync(
    engine: Engine, client: DeltaReader, conn_id: int, log: Log | None = None
) -> GroupsResult:
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
