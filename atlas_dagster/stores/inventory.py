"""The inventory cache (``inventory_items``, ``inventory_assignments``): one contract's listing
written chunk by chunk, and the deletions its sync decides on.

An object that cannot be stored alike on both backends (see ``storage_problem``) is left as it
was and named on the result; the rest of its chunk is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.reasons import PROVIDER_BAD_RESPONSE, GraphError, one_line
from atlas_dagster.stores import bulk
from atlas_dagster.stores.cache import parse_graph_datetime
from graph_contracts import (
    Contract,
    classify,
    content_hash,
    extract_assignments,
    object_modified,
    object_name,
)


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

    def soft_delete(self, external_ids: list[str]) -> None:
        """Mark these cached objects deleted and drop their assignments, in one transaction."""
        if not external_ids:
            return
        t = schema.inventory_items
        with self.engine.begin() as conn:
            bulk.update_where_in(
                conn, t, t.c.external_id, external_ids, self.scope, deleted_at=self.now
            )
            self._delete_assignments(conn, external_ids)

    def _delete_assignments(self, conn: sa.Connection, external_ids: Iterable[str]) -> None:
        a = schema.inventory_assignments
        scope = sa.and_(
            a.c.provider_connection_id == self.conn_id, a.c.contract_key == self.contract.key
        )
        for batch in bulk.chunks(external_ids, 5_000):
            conn.execute(a.delete().where(scope, a.c.external_id.in_(batch)))
