"""The ``inventory`` asset: every policy type of the registry, with assignments, per tenant.

Reading is streamed per contract; writing is bulk. A listing that did not complete (an error, a
403, a truncated page) deletes nothing for its type, and a complete listing that would delete more
than the configured share of a type holds its deletions back (the blocking mass-deletion check).
"""

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dagster as dg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import bulk, schema
from atlas_dagster.assets.common import (
    active_rows,
    connection_for_run,
    freshness_result,
    graph_metadata,
    markdown_table,
    parse_graph_datetime,
)
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.mirror import OperationHandle, operation_scope
from atlas_dagster.readiness import record_denied
from atlas_dagster.reasons import (
    FATAL_FOR_ALL_TYPES,
    PROVIDER_BAD_RESPONSE,
    AtlasError,
    GraphError,
)
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from graph_contracts import (
    CONTRACTS,
    POLICY_CONTRACTS,
    Contract,
    classify,
    content_hash,
    extract_assignments,
    object_modified,
    object_name,
)

# The guard ignores types too small for a share to mean anything.
MASS_DELETION_MIN_ITEMS = 3
CHUNK = 500


@dataclass
class ContractResult:
    contract_key: str
    seen: int = 0
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)
    complete: bool = False
    active_before: int = 0
    per_policy_type: dict[str, int] = field(default_factory=dict)
    error: GraphError | None = None


def item_row(
    conn_id: int, contract: Contract, obj: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The inventory_items row and inventory_assignments rows of one Graph object (pure)."""
    kind = classify(contract, obj)
    external_id = str(obj["id"])
    row = {
        "provider_connection_id": conn_id,
        "contract_key": contract.key,
        "external_id": external_id,
        "odata_type": obj.get("@odata.type"),
        "policy_type": kind.policy_type,
        "display_name": object_name(contract, obj),
        "platform": kind.platform,
        "last_modified_at": parse_graph_datetime(object_modified(contract, obj)),
        "content_hash": content_hash(contract, obj),
        "payload": obj,
        "is_builtin": kind.builtin,
        "first_seen_at": now,
        "last_seen_at": now,
        "deleted_at": None,
    }
    assignments = [
        {
            "provider_connection_id": conn_id,
            "contract_key": contract.key,
            "external_id": external_id,
            **a,
        }
        for a in extract_assignments(obj)
    ]
    return row, assignments


class InventoryWriter:
    """Writes one contract's listing into the cache, chunk by chunk."""

    def __init__(self, engine: Engine, conn_id: int, contract: Contract, now: datetime):
        self.engine, self.conn_id, self.contract, self.now = engine, conn_id, contract, now
        t = schema.inventory_items
        self.scope = sa.and_(
            t.c.provider_connection_id == conn_id, t.c.contract_key == contract.key
        )
        with engine.connect() as conn:
            self.known = {
                r.external_id: (r.content_hash, r.deleted_at)
                for r in conn.execute(
                    sa.select(t.c.external_id, t.c.content_hash, t.c.deleted_at).where(self.scope)
                )
            }
        self.result = ContractResult(
            contract.key, active_before=sum(1 for _, d in self.known.values() if d is None)
        )
        self.seen: set[str] = set()

    def write(self, objects: list[dict[str, Any]]) -> None:
        # Checked before anything is counted, so a refused chunk leaves no trace on the result.
        if any(obj.get("id") is None for obj in objects):
            raise GraphError(
                PROVIDER_BAD_RESPONSE,
                f"{self.contract.key}: an object without an id",
                contract_key=self.contract.key,
            )
        items, assignments, changed, unchanged = [], [], [], []
        for obj in objects:
            row, rows = item_row(self.conn_id, self.contract, obj, self.now)
            external_id = row["external_id"]
            if external_id in self.seen:
                continue  # Graph repeated an object across pages: first sight wins
            self.seen.add(external_id)
            self.result.seen += 1
            self.result.per_policy_type[row["policy_type"]] = (
                self.result.per_policy_type.get(row["policy_type"], 0) + 1
            )
            known = self.known.get(external_id)
            if known is not None and known[0] == row["content_hash"] and known[1] is None:
                unchanged.append(external_id)
                continue
            if known is None or known[1] is not None:
                self.result.created.append(external_id)
            else:
                self.result.updated.append(external_id)
            items.append(row)
            assignments.extend(rows)
            changed.append(external_id)
        if not (items or unchanged):
            return  # no transaction (on SQLite, no write lock) for an empty chunk
        t, a = schema.inventory_items, schema.inventory_assignments
        with self.engine.begin() as conn:
            if items:
                bulk.upsert(
                    conn,
                    t,
                    items,
                    ("provider_connection_id", "contract_key", "external_id"),
                    update=[c for c in items[0] if c != "first_seen_at"],
                )
                self._delete_assignments(conn, changed)
                if assignments:
                    conn.execute(a.insert(), assignments)
            if unchanged:
                bulk.update_where_in(
                    conn, t, t.c.external_id, unchanged, self.scope, last_seen_at=self.now
                )

    def finish(self, threshold: float) -> ContractResult:
        """The listing completed: soft-delete what it no longer holds (unless the guard holds)."""
        self.result.complete = True
        missing = [
            k for k, (_, deleted) in self.known.items() if deleted is None and k not in self.seen
        ]
        before = self.result.active_before
        if (
            missing
            and len(missing) >= MASS_DELETION_MIN_ITEMS
            and len(missing) > threshold * before
        ):
            self.result.held_back = missing
            return self.result
        if missing:
            t = schema.inventory_items
            with self.engine.begin() as conn:
                bulk.update_where_in(
                    conn, t, t.c.external_id, missing, self.scope, deleted_at=self.now
                )
                self._delete_assignments(conn, missing)
            self.result.deleted = missing
        return self.result

    def _delete_assignments(self, conn: sa.Connection, external_ids: Iterable[str]) -> None:
        a = schema.inventory_assignments
        scope = sa.and_(
            a.c.provider_connection_id == self.conn_id, a.c.contract_key == self.contract.key
        )
        for batch in bulk.chunks(external_ids, 5_000):
            conn.execute(a.delete().where(scope, a.c.external_id.in_(batch)))


def sync_contract(
    engine: Engine,
    conn_id: int,
    contract: Contract,
    objects: Iterator[dict[str, Any]],
    *,
    threshold: float,
    now: datetime | None = None,
) -> ContractResult:
    """Stream one contract's objects into the cache. A GraphError mid-listing keeps what was
    read, deletes nothing, and is returned on the result."""
    writer = InventoryWriter(engine, conn_id, contract, now or schema.utcnow())
    chunk: list[dict[str, Any]] = []
    try:
        for obj in objects:
            chunk.append(obj)
            if len(chunk) >= CHUNK:
                writer.write(chunk)
                chunk = []
        writer.write(chunk)
    except GraphError as exc:
        if chunk:
            writer.write([o for o in chunk if o.get("id") is not None])
        writer.result.error = exc
        return writer.result
    return writer.finish(threshold)


@dataclass
class InventorySummary:
    results: list[ContractResult]
    duration_s: float
    graph: dict[str, int]

    def totals(self) -> dict[str, int]:
        return {
            "items": sum(r.seen for r in self.results),
            "created": sum(len(r.created) for r in self.results),
            "updated": sum(len(r.updated) for r in self.results),
            "deleted": sum(len(r.deleted) for r in self.results),
            "deletions_held_back": sum(len(r.held_back) for r in self.results),
            "contracts_failed": sum(1 for r in self.results if r.error is not None),
            "graph_requests": self.graph.get("requests", 0),
            "graph_request_units": self.graph.get("request_units", 0),
            "throttled_retries": self.graph.get("throttled_retries", 0),
        }


def run_inventory_sync(
    engine: Engine,
    client: Any,
    conn_id: int,
    handle: OperationHandle | None,
    *,
    contract_keys: Iterable[str] = POLICY_CONTRACTS,
    threshold: float = 0.5,
    log: Any = None,
) -> InventorySummary:
    """Sync every contract; one failing contract never stops the others (unless the failure
    is one no contract can escape, such as sign-in)."""
    started = time.monotonic()
    before = client.stats.as_dict()
    results: list[ContractResult] = []
    for key in contract_keys:
        contract = CONTRACTS[key]
        result = sync_contract(
            engine, conn_id, contract, client.read_policies(key), threshold=threshold
        )
        results.append(result)
        if log is not None:
            log.info(
                f"{key}: {result.seen} items, +{len(result.created)} ~{len(result.updated)} "
                f"-{len(result.deleted)}"
                + (f" ({result.error.reason_code})" if result.error else "")
            )
        if result.error is not None:
            record_denied(engine, conn_id, result.error, handle.id if handle else None)
            if result.error.reason_code in FATAL_FOR_ALL_TYPES:
                raise result.error
            if handle is not None:
                handle.fail(result.error.reason_code, str(result.error), key)
        if result.held_back and handle is not None:
            handle.fail(
                PROVIDER_BAD_RESPONSE,
                f"mass-deletion guard: {len(result.held_back)} of {result.active_before} "
                f"{key} objects would be deleted (more than {threshold:.0%}); deletions held back",
                key,
            )
    graph = client.stats.since(before)
    summary = InventorySummary(results, time.monotonic() - started, graph)
    if handle is not None:
        handle.progress(**summary.totals())
    if results and all(r.error is not None for r in results):
        raise AtlasError(
            results[0].error.reason_code,  # type: ignore[union-attr]
            f"every policy type failed; first: {results[0].error}",
        )
    return summary


def _metadata(summary: InventorySummary, handle: OperationHandle) -> dict[str, Any]:
    per_type: dict[str, int] = {}
    for r in summary.results:
        for policy_type, n in r.per_policy_type.items():
            per_type[policy_type] = per_type.get(policy_type, 0) + n
    changed = [
        (
            r.contract_key,
            len(r.created),
            len(r.updated),
            len(r.deleted),
            len(r.held_back),
            r.error.reason_code if r.error else "",
        )
        for r in summary.results
        if r.created or r.updated or r.deleted or r.held_back or r.error
    ]
    return {
        **{k: dg.MetadataValue.int(v) for k, v in summary.totals().items()},
        "items_per_policy_type": dg.MetadataValue.json(dict(sorted(per_type.items()))),
        "duration_s": dg.MetadataValue.float(round(summary.duration_s, 3)),
        "operation_run_id": dg.MetadataValue.int(handle.id),
        **graph_metadata(summary.graph),
        "changes": dg.MetadataValue.md(
            markdown_table(
                ("contract", "created", "updated", "deleted", "held back", "failure"),
                changed,
                empty="No changes since the previous sync.",
            )
        ),
    }


@dg.asset(
    name="inventory",
    partitions_def=provider_connection_partitions,
    group_name="tenant_cache",
    description="The tenant's Intune and conditional access configuration with assignments "
    "(tables inventory_items, inventory_assignments).",
    check_specs=[
        dg.AssetCheckSpec(
            "mass_deletion",
            asset="inventory",
            blocking=True,
            description="No policy type lost more than the configured share in one sync.",
        ),
        dg.AssetCheckSpec(
            "non_empty",
            asset="inventory",
            description="The tenant's inventory holds at least one object.",
        ),
    ],
    kinds={"python", "sql"},
)
def inventory(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
):
    with operation_scope(context, ledger) as handle:
        config = database.config()
        connection, conn_id = connection_for_run(database, context.partition_key)
        scope = handle.row.context.get("target_scope")
        keys = (
            POLICY_CONTRACTS
            if scope in (None, "all")
            else [k for k in str(scope).split(",") if k in POLICY_CONTRACTS]
        )
        summary = run_inventory_sync(
            database.engine(),
            graph.client(connection),
            conn_id,
            handle,
            contract_keys=keys,
            threshold=config.mass_deletion_threshold,
            log=context.log,
        )
        held = {r.contract_key: len(r.held_back) for r in summary.results if r.held_back}
        active = active_rows(database.engine(), schema.inventory_items, conn_id)
        yield dg.MaterializeResult(metadata=_metadata(summary, handle))
        yield dg.AssetCheckResult(
            check_name="mass_deletion",
            passed=not held,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"held_back": dg.MetadataValue.json(held)},
            description=None if not held else f"deletions held back for {', '.join(held)}",
        )
        yield dg.AssetCheckResult(
            check_name="non_empty",
            passed=active > 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"active_items": dg.MetadataValue.int(active)},
        )


@dg.asset_check(
    asset=inventory,
    name="fresh",
    description="Every configured connection's inventory was refreshed in the last 26 hours.",
)
def inventory_fresh(database: DatabaseResource) -> dg.AssetCheckResult:
    return freshness_result(database, schema.inventory_items.c.last_seen_at)


inventory_sync_job = dg.define_asset_job(
    "inventory_sync_job",
    selection=dg.AssetSelection.assets(inventory),
    description="Run type inventory.sync: refresh the inventory of one provider connection.",
)
