"""The ``inventory`` asset: every policy type of the registry, with assignments, per tenant.

The contracts are read side by side (``GraphClient.policy_reads``) and written one after another,
in bulk, in contract order, from the asset's own thread. A listing that did not complete (an
error, a 403, a truncated page) deletes nothing for its type. A listing can also end early
without an error, so what a complete listing did not return is deleted only once a second
listing agrees it is gone: its pages alone (no per-item reads), and only for a type that lost
something.

The mass-deletion guard: when the confirmed deletions of a type reach the configured share of it
(and at least ``MASS_DELETION_MIN_ITEMS``), they are held back, recorded in the run's context as
``held_deletions`` ({contract key: [external ids]}), and the run partially succeeds with
``mass_deletion_held``. A run started with ``accept_deletions`` applies the deletions the
connection's last hold listed that are still confirmed gone; newer ones face the guard again.

An object that cannot be stored (see ``stores.inventory.storage_problem``) fails alone, named in
the ledger by contract and id; the rest of its type is synced.
"""

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import dagster as dg
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.assets.common import (
    Log,
    Progress,
    connection_for_run,
    freshness_result,
    graph_counts,
    int_metadata,
    markdown_table,
    table_metadata,
)
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.graph import GraphClient
from atlas_dagster.ledger.job import OperationHandle, operation_scope
from atlas_dagster.ledger.run_types import Outcome
from atlas_dagster.ledger.store import OperationLedger, OperationRun
from atlas_dagster.reasons import (
    FATAL_FOR_ALL_TYPES,
    MASS_DELETION_HELD,
    PROVIDER_BAD_RESPONSE,
    AtlasError,
    GraphError,
)
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.stores.cache import active_rows
from atlas_dagster.stores.checks import record_denied
from atlas_dagster.stores.inventory import ContractResult, InventoryWriter
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, Contract

# Fewer deletions of a type than this are never held: one policy of one is no mass deletion.
MASS_DELETION_MIN_ITEMS = 5
CHUNK = 500
# How many objects a failure message names before it only counts the rest.
NAMED_IN_MESSAGE = 10


def holds_deletions(deletions: int, active: int, threshold: float) -> bool:
    """The mass-deletion guard: hold ``deletions`` of a type's ``active`` objects when they are
    at least the minimum and at least ``threshold`` of the type."""
    return deletions >= MASS_DELETION_MIN_ITEMS and deletions / active >= threshold


def _apply_deletions(
    writer: InventoryWriter, threshold: float, gone: list[str], accepted: Collection[str]
) -> ContractResult:
    """The listing completed and ``gone`` are the unlisted objects confirmed gone: soft-delete
    those ``accepted`` from the last hold, and the others unless the guard holds them."""
    result = writer.result
    result.complete = True
    result.accepted = [k for k in gone if k in accepted]
    newer = [k for k in gone if k not in accepted]
    if newer and holds_deletions(len(newer), result.active_before, threshold):
        result.held_back, newer = newer, []
    missing = result.accepted + newer
    writer.soft_delete(missing)
    result.deleted = missing
    return result


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
    return _apply_deletions(writer, threshold, gone, accepted)


def listed_ids(client: GraphClient, contract_key: str) -> set[str]:
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
    client: GraphClient,
    conn_id: int,
    handle: OperationHandle | None,
    *,
    contract_keys: Iterable[str] = POLICY_CONTRACTS,
    threshold: float = 0.5,
    accepted: Mapping[str, Collection[str]] | None = None,
    log: Log | None = None,
) -> InventorySummary:
    """Sync every contract; one failing contract never stops the others (unless the failure
    is one no contract can escape, such as sign-in). ``accepted``: deletions (contract key →
    external ids) the guard no longer holds."""
    started = time.monotonic()
    before = client.stats.as_dict()
    results: list[ContractResult] = []
    # The contracts are read side by side; each is written here, in order, once it is read.
    with client.policy_reads(contract_keys) as reads, Progress(log) as progress:
        for read in reads:
            key = read.contract_key
            result = sync_contract(
                engine,
                conn_id,
                CONTRACTS[key],
                read.replay(),
                threshold=threshold,
                listed_again=partial(listed_ids, client, key),
                accepted=frozenset((accepted or {}).get(key, ())),
            )
            results.append(result)
            progress.add(
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
