"""Restore (DESIGN §9) in Dagster: ``restore_plan`` (run type ``restore.plan``) reads the target
tenant and stores what a restore of a backup set would do; ``restore_execution`` (run type
``restore.execute``) executes one plan, once. Both are partitioned by connection; the plan's
items, and the execution's results, are their runs' metadata."""

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg
import sqlalchemy as sa

from atlas_dagster import schema
from atlas_dagster.assets.common import (
    connection_for_run,
    graph_counts,
    int_metadata,
    markdown_table,
)
from atlas_dagster.config import AtlasConfig, ProviderConnection
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.ledger.job import operation_scope
from atlas_dagster.ledger.run_types import Outcome
from atlas_dagster.reasons import RESTORE_CONFLICT, RESTORE_UNSUPPORTED, AtlasError
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource, client_for
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.restore import store as plans
from atlas_dagster.restore.execute import (
    FAILED_RESULTS,
    Executor,
    PlanRefused,
    check_executable,
)
from atlas_dagster.restore.plan import Planner, Selection
from atlas_dagster.stores.backups import SET_COMPLETE, SET_PARTIAL, list_sets, require_set


def tenant_of(config: AtlasConfig, key: str) -> str | None:
    """The tenant a configured connection signs in to (a simulated one's too); no request."""
    try:
        connection = config.connection(key)
    except KeyError:
        return None
    return client_for(connection).connection.tenant_id


def _source(
    config: AtlasConfig, engine: sa.Engine, connection_id: int
) -> tuple[ProviderConnection | None, str | None]:
    """The backup's connection as configured now (None once it left the config), and the
    tenant it signs in to (else the one recorded)."""
    pc = schema.provider_connections
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(pc.c.key, pc.c.tenant_id).where(pc.c.id == connection_id)
        ).first()
    if row is None:
        return None, None
    try:
        connection = config.connection(row.key)
    except KeyError:
        return None, row.tenant_id
    return connection, tenant_of(config, row.key) or row.tenant_id


def _newest_set(engine: sa.Engine, connection_key: str) -> int:
    for backup in list_sets(engine, connection=connection_key):
        if backup.status in (SET_COMPLETE, SET_PARTIAL):
            return backup.id
    raise AtlasError(
        RESTORE_UNSUPPORTED,
        f"nothing to restore from: connection {connection_key!r} has no complete backup set",
    )


def items_table(items: Iterable[Mapping[str, Any]], *, results: bool = False) -> str:
    """The items that do something, or say something (an unchanged policy held in report-only);
    the counts of all items are metadata of their own."""
    headers = ["#", "type", "name", "action", "reason", "changes" if not results else "result"]
    rows = []
    for item in items:
        if item["action"] == "unchanged" and not item.get("message"):
            continue
        last = (
            f"{item.get('result') or ''}{' ✓' if item.get('verified') else ''}"
            if results
            else len(item.get("changes") or ())
        )
        rows.append(
            (
                item["position"],
                item["contract_key"],
                item.get("display_name") or "",
                item["action"],
                item.get("reason_code") or "",
                last,
            )
        )
    return markdown_table(
        headers, rows, empty="nothing to restore: every item is unchanged", limit=200
    )


@dg.asset(
    name="restore_plan",
    partitions_def=provider_connection_partitions,
    group_name="restore",
    description="What a restore of a backup set into this connection would do, item by item "
    "(table restore_plans, restore_items). Reads the tenant live; writes nothing to it. From "
    "the UI, plans the connection's newest backup set.",
    kinds={"python", "sql"},
)
def restore_plan(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
) -> dg.MaterializeResult:
    with operation_scope(context, ledger) as handle:
        connection, conn_id = connection_for_run(database, context.partition_key)
        engine = database.engine()
        scope = str(handle.row.context.get("target_scope") or "")
        if scope.startswith("restore:"):
            set_id, selection = Selection.from_scope(scope)
        else:
            set_id, selection = _newest_set(engine, connection.key), Selection()
        backup = require_set(engine, set_id)
        client = graph.client(connection)
        source, source_tenant = _source(database.config(), engine, backup.provider_connection_id)
        # Another tenant's set: the names of what its policies name are read from there.
        source_client = (
            graph.client(source) if source is not None and source.key != connection.key else None
        )
        clients = [c for c in (client, source_client) if c is not None]
        before = [c.stats.as_dict() for c in clients]
        planner = Planner(
            client,
            handle.fenced(engine),
            connection_id=conn_id,
            source_connection_id=backup.provider_connection_id,
            source_tenant_id=source_tenant,
            source_client=source_client,
            log=context.log,
        )
        result = planner.plan(set_id, selection, handle.id)
        handle.set_context(restore_run_id=result.plan_id, backup_schedule_run_id=set_id)
        traffic = Counter[str]()
        for c, b in zip(clients, before, strict=True):
            traffic.update(c.stats.since(b))
        handle.progress(**result.summary, **graph_counts(traffic))
        context.log.info(f"restore plan #{result.plan_id}: {result.summary}")
        return dg.MaterializeResult(
            metadata={
                "restore_plan_id": dg.MetadataValue.int(result.plan_id),
                "backup_set_id": dg.MetadataValue.int(set_id),
                "operation_run_id": dg.MetadataValue.int(handle.id),
                **int_metadata(result.summary),
                "plan": dg.MetadataValue.md(items_table(result.items)),
            }
        )


@dg.asset(
    name="restore_execution",
    partitions_def=provider_connection_partitions,
    group_name="restore",
    description="One restore plan executed, once (`atlas-dagster restore execute --plan ID "
    "--confirm`). A run without a plan, a re-execution or a retry writes nothing.",
    kinds={"python", "sql"},
)
def restore_execution(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
) -> dg.MaterializeResult:
    with operation_scope(context, ledger) as handle:
        plan_id = handle.row.context.get("restore_run_id")
        if not plan_id:
            raise PlanRefused(
                RESTORE_CONFLICT,
                "restore_execute_job executes a plan named by its start: use atlas-dagster "
                "restore execute --plan ID --confirm (nothing was written)",
            )
        engine = database.engine()
        plan = plans.get_plan(engine, int(plan_id))
        if plan is None or plan.provider_connection != context.partition_key:
            raise PlanRefused(
                RESTORE_CONFLICT,
                f"restore plan #{plan_id} is not a plan of connection {context.partition_key!r}",
            )
        connection, _ = connection_for_run(database, context.partition_key)
        client = graph.client(connection)
        before = client.stats.as_dict()
        now = schema.utcnow()
        check_executable(plan, str(client.token_claims().get("tid") or ""), now)
        fenced = handle.fenced(engine)
        if not plans.take(fenced, plan.id, handle.id, now):
            raise PlanRefused(
                RESTORE_CONFLICT,
                f"restore plan #{plan.id} was taken by another execution: nothing was written",
            )
        items = plans.plan_items(engine, plan.id)
        execution = Executor(client, fenced, plan, log=context.log).run(items)
        summary = execution.summary()
        plans.finish(fenced, plan.id, summary)
        by_position = {i.position: i for i in items}
        for r in execution.results:
            if r.result in FAILED_RESULTS:
                item = by_position[r.position]
                handle.fail(
                    r.reason_code or RESTORE_CONFLICT,
                    f"{item.display_name or item.source_external_id}: {r.error or r.result}",
                    item.contract_key,
                )
        handle.progress(**summary, **graph_counts(client.stats.since(before)))
        if any(r.verified is False for r in execution.results):
            handle.declare_outcome(Outcome.PARTIALLY_SUCCEEDED)
        done = [
            {**i.to_dict(), "result": r.result, "verified": r.verified}
            for i, r in ((by_position[r.position], r) for r in execution.results)
        ]
        return dg.MaterializeResult(
            metadata={
                "restore_plan_id": dg.MetadataValue.int(plan.id),
                "operation_run_id": dg.MetadataValue.int(handle.id),
                **int_metadata(summary),
                "results": dg.MetadataValue.md(items_table(done, results=True)),
            }
        )


restore_plan_job = dg.define_asset_job(
    "restore_plan_job",
    selection=dg.AssetSelection.assets(restore_plan),
    description="Run type restore.plan: what a restore would do (reads the tenant, writes "
    "nothing to it).",
)
restore_execute_job = dg.define_asset_job(
    "restore_execute_job",
    selection=dg.AssetSelection.assets(restore_execution),
    description="Run type restore.execute: one plan's writes, once.",
)
