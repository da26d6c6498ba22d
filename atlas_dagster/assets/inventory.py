"""The ``inventory`` asset: every policy type of the registry, with assignments, per tenant.

Reading is streamed per contract; writing is bulk. A listing that did not complete (an error, a
403, a truncated page) deletes nothing for its type. A listing can also end early without an
error, so what a complete listing did not return is deleted only once a second listing agrees
it is gone: its pages alone (no per-item reads), and only for a type that lost something.

The mass-deletion guard: when the confirmed deletions of a type reach the configured share of it
(and at least ``MASS_DELETION_MIN_ITEMS``), they are held back, recorded in the run's context as
``held_deletions`` ({contract key: [external ids]}), and the run partially succeeds with
``mass_deletion_held``. A run started with ``accept_deletions`` applies the deletions the
connection's last hold listed that are still confirmed gone; newer ones face the guard again.

An object that cannot be stored (see ``storage_problem``) fails alone, named in the ledger by
contract and id; the rest of its type is synced.
"""

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
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
    table_metadata,
)
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.ledger.job import OperationHandle, operation_scope
from atlas_dagster.ledger.run_types import Outcome
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.readiness import record_denied
from atlas_dagster.reasons import (
    FATAL_FOR_ALL_TYPES,
    MASS_DELETION_HELD,
    PROVIDER_BAD_RESPONSE,
    AtlasError,
    GraphError,
    one_line,
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

# Fewer deletions of a type than this are never held: one policy of one is no mass deletion.
MASS_DELETION_MIN_ITEMS = 5
CHUNK = 500
# How many objects a failure message names before it only counts the rest.
NAMED_IN_MESSAGE = 10


def holds_deletions(deletions: int, active: int, threshold: float) -> bool:
    """The mass-deletion guard: hold ``deletions`` of a type's ``active`` objects when they are
    at least the minimum and at least ``threshold`` of the type."""
    return deletions >= MASS_DELETION_MIN_ITEMS and deletions / active >= threshold


@dataclass
class ContractResult:
    contract_key: str
    seen: int = 0
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)
    # Deletions applied because a run with accept_deletions found them in the last hold.
    accepted: list[str] = field(default_factory=list)
    # Objects the listing did not return that a second listing still did: kept, not refreshed.
    unconfirmed: list[str] = field(default_factory=list)
    # (external id, why) of objects that could not be stored.
    not_stored: list[tuple[str, str]] = field(default_factory=list)
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


def storage_problem(row: dict[str, Any], assignments: list[dict[str, Any]]) -> str | None:
    """Why one object's rows cannot be stored alike on both backends, or None (pure)."""
    tables = [(schema.inventory_items, row)]
    tables += [(schema.inventory_assignments, a) for a in assignments]
    return next((p for t, r in tables if (p := bulk.row_problem(t, r)) is not None), None)


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
            external_id = str(obj["id"])
            if external_id in self.seen:
                continue  # Graph repeated an object across pages: first sight wins
            self.seen.add(external_id)  # listed, so never deleted, even if it cannot be stored
            try:
                row, rows = item_row(self.conn_id, self.contract, obj, self.now)
            except ValueError as exc:  # a date that is not one, text UTF-8 cannot encode
                self.result.not_stored.append((external_id, one_line(exc)))
                continue
            problem = storage_problem(row, rows)
            if problem is not None:
                self.result.not_stored.append((external_id, problem))
                continue
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
        assignments = bulk.storable_rows(a, assignments)
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

    def unlisted(self) -> list[str]:
        """The active cached objects the listing has not returned."""
        return [
            k for k, (_, deleted) in self.known.items() if deleted is None and k not in self.seen
        ]

    def finish(
        self, threshold: float, gone: list[str], accepted: Collection[str]
    ) -> ContractResult:
        """The listing completed and ``gone`` are the unlisted objects confirmed gone: soft-delete
        those ``accepted`` from the last hold, and the others unless the guard holds them."""
        self.result.complete = True
        self.result.accepted = [k for k in gone if k in accepted]
        newer = [k for k in gone if k not in accepted]
        if newer and holds_deletions(len(newer), self.result.active_before, threshold):
            self.result.held_back, newer = newer, []
        missing = self.result.accepted + newer
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
    listed_again: Callable[[], Iterable[str]],
    accepted: Collection[str] = frozenset(),
    now: datetime | None = None,
) -> ContractResult:
    """Stream one contract's objects into the cache. A GraphError mid-listing keeps what was
    read, deletes nothing, and is returned on the result. An object the listing did not return
    is deleted only when ``listed_again`` (the ids of a second listing, asked for only then)
    lacks it too; ``accepted`` are deletions the guard no longer holds."""
    writer = InventoryWriter(engine, conn_id, contract, now or schema.utcnow())
    chunk: list[dict[str, Any]] = []
    try:
        for obj in objects:
            chunk.append(obj)
            if len(chunk) >= CHUNK:
                writer.write(chunk)
                chunk = []
        writer.write(chunk)
        chunk = []
        gone = writer.unlisted()
        if gone:
            again = set(listed_again())
            writer.result.unconfirmed = [k for k in gone if k in again]
            gone = [k for k in gone if k not in again]
    except GraphError as exc:
        if chunk:
            writer.write([o for o in chunk if o.get("id") is not None])
        writer.result.error = exc
        return writer.result
    return writer.finish(threshold, gone, accepted)


def listed_ids(client: Any, contract_key: str) -> set[str]:
    """The ids of one plain listing of a contract (its pages only: no per-item reads)."""
    return {
        str(obj["id"])
        for page in client.pages(contract_key)
        for obj in page
        if obj.get("id") is not None
    }


def _named(ids: list[str]) -> str:
    shown = ", ".join(ids[:NAMED_IN_MESSAGE])
    return shown + (
        f" and {len(ids) - NAMED_IN_MESSAGE} more" if len(ids) > NAMED_IN_MESSAGE else ""
    )


def object_failures(result: ContractResult) -> list[str]:
    """Failure messages for what one type could not do object by object (pure)."""
    key, messages = result.contract_key, []
    if result.not_stored:
        messages.append(
            f"{key}: {len(result.not_stored)} object(s) could not be stored and were left as "
            "they were; the rest of the type was synced: "
            + _named([f"{i} ({why})" for i, why in result.not_stored])
        )
    if result.unconfirmed:
        messages.append(
            f"{key}: the listing ended early without an error: {len(result.unconfirmed)} "
            "object(s) it did not return are still listed by Graph, so they were kept (not "
            "refreshed): " + _named(result.unconfirmed)
        )
    return messages


def hold_message(result: ContractResult, connection_key: str, threshold: float) -> str:
    """The ledger's word on one type's held deletions: what, why, and how to accept them."""
    held, before = len(result.held_back), result.active_before
    return (
        f"mass-deletion guard: {held} of {before} {result.contract_key} objects "
        f"({held / before:.0%}) are gone from the tenant, at or above the {threshold:.0%} "
        "threshold; they were kept, not deleted. If that is intended, accept these deletions "
        f"once: atlas-dagster start inventory.sync --connection {connection_key} "
        "--accept-deletions"
    )


def last_hold(ledger: OperationLedger, row: OperationRun) -> dict[str, list[str]]:
    """The deletions the connection's last hold listed (contract key → external ids), for
    ``row`` to accept. Per contract, the newest earlier sync (of the latest 100) that held or
    accepted its deletions decides: a hold once accepted is spent, and a newer hold replaces
    an older one."""
    decided: dict[str, list[str]] = {}
    for earlier in ledger.list(provider_connection_id=row.provider_connection_id, type=row.type):
        if earlier.id >= row.id:
            continue
        held = earlier.context.get("held_deletions") or {}
        accepted = earlier.context.get("accepted_deletions") or {}
        for key in {*held, *accepted} - decided.keys():
            decided[key] = list(held.get(key, ()))
    return {key: ids for key, ids in decided.items() if ids}


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
            "deletions_accepted": sum(len(r.accepted) for r in self.results),
            "deletions_unconfirmed": sum(len(r.unconfirmed) for r in self.results),
            "objects_not_stored": sum(len(r.not_stored) for r in self.results),
            "contracts_failed": sum(1 for r in self.results if r.error is not None),
            **graph_counts(self.graph),
        }


def run_inventory_sync(
    engine: Engine,
    client: Any,
    conn_id: int,
    handle: OperationHandle | None,
    *,
    contract_keys: Iterable[str] = POLICY_CONTRACTS,
    threshold: float = 0.5,
    accepted: Mapping[str, Collection[str]] | None = None,
    log: Any = None,
) -> InventorySummary:
    """Sync every contract; one failing contract never stops the others (unless the failure
    is one no contract can escape, such as sign-in). ``accepted``: deletions (contract key →
    external ids) the guard no longer holds."""
    started = time.monotonic()
    before = client.stats.as_dict()
    results: list[ContractResult] = []
    for key in contract_keys:
        contract = CONTRACTS[key]
        result = sync_contract(
            engine,
            conn_id,
            contract,
            client.read_policies(key),
            threshold=threshold,
            listed_again=partial(listed_ids, client, key),
            accepted=frozenset((accepted or {}).get(key, ())),
        )
        results.append(result)
        if log is not None:
            log.info(
                f"{key}: {result.seen} items, +{len(result.created)} ~{len(result.updated)} "
                f"-{len(result.deleted)}"
                + (f", {len(result.held_back)} deletions held" if result.held_back else "")
                + (f" ({result.error.reason_code})" if result.error else "")
            )
        if handle is not None:
            for message in object_failures(result):
                handle.fail(PROVIDER_BAD_RESPONSE, message, key)
        if result.error is not None:
            record_denied(engine, conn_id, result.error, handle.id if handle else None)
            if result.error.reason_code in FATAL_FOR_ALL_TYPES:
                raise result.error
            if handle is not None:
                handle.fail(result.error.reason_code, str(result.error), key)
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


def record_holds(
    handle: OperationHandle, summary: InventorySummary, connection_key: str, threshold: float
) -> None:
    """Put the guard's verdict on the run's row: each hold as a ``mass_deletion_held`` failure
    and its ids in ``held_deletions`` (the list a later run accepts), what this run accepted in
    ``accepted_deletions``; a hold makes the run partially succeed."""
    held: dict[str, list[str]] = {}
    for result in summary.results:
        if result.held_back:
            held[result.contract_key] = result.held_back
            handle.fail(
                MASS_DELETION_HELD,
                hold_message(result, connection_key, threshold),
                result.contract_key,
            )
    accepted = {r.contract_key: r.accepted for r in summary.results if r.accepted}
    context: dict[str, Any] = {}
    if held:
        context["held_deletions"] = held
    if accepted:
        context["accepted_deletions"] = accepted
    if context:
        handle.set_context(**context)
    if held:
        handle.declare_outcome(Outcome.PARTIALLY_SUCCEEDED)


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
        **int_metadata(summary.totals()),
        "items_per_policy_type": table_metadata(
            (("policy_type", "string"), ("items", "int")), sorted(per_type.items())
        ),
        "duration_s": dg.MetadataValue.float(round(summary.duration_s, 3)),
        "operation_run_id": dg.MetadataValue.int(handle.id),
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
            description="No policy type's deletions were held back by the mass-deletion guard "
            "(at or above the configured share of the type). A hold warns: the rest of the "
            "inventory was refreshed, and the held objects stay cached until accepted.",
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
        # A run started with --accept-deletions applies what the last hold listed.
        accepted = (
            last_hold(handle.ledger, handle.row)
            if handle.row.context.get("accept_deletions")
            else None
        )
        summary = run_inventory_sync(
            handle.fenced(database.engine()),
            graph.client(connection),
            conn_id,
            handle,
            contract_keys=keys,
            threshold=config.mass_deletion_threshold,
            accepted=accepted,
            log=context.log,
        )
        record_holds(handle, summary, connection.key, config.mass_deletion_threshold)
        held = {r.contract_key: len(r.held_back) for r in summary.results if r.held_back}
        active = active_rows(database.engine(), schema.inventory_items, conn_id)
        yield dg.MaterializeResult(metadata=_metadata(summary, handle))
        yield dg.AssetCheckResult(
            check_name="mass_deletion",
            passed=not held,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"held_back": dg.MetadataValue.json(held)},
            description=None
            if not held
            else f"deletions held back for {', '.join(held)}; accept them once with "
            f"`atlas-dagster start inventory.sync --connection {connection.key} "
            "--accept-deletions`",
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
