"""A restore plan (``restore.plan``): the target tenant read live, each backed-up item matched,
mapped and compared, and what an execution would write stored with it. It only reads the
tenant (DESIGN §9)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from atlas_dagster.graph import GraphClient
from atlas_dagster.reasons import (
    FATAL_FOR_ALL_TYPES,
    PROVIDER_PERMISSION_DENIED,
    RESTORE_CONFLICT,
    RESTORE_UNSUPPORTED,
    AtlasError,
    GraphError,
)
from atlas_dagster.restore import rules
from atlas_dagster.restore import store as plans
from atlas_dagster.restore.references import Backed, ReferenceMapper
from atlas_dagster.stores.backups import (
    SET_COMPLETE,
    SET_PARTIAL,
    load_payloads,
    require_set,
    set_items,
)
from graph_contracts import (
    CONTRACTS,
    POLICY_CONTRACTS,
    Contract,
    canonical_json,
    classify,
    missing_permissions,
    restore_skip,
)

if TYPE_CHECKING:  # the assets' log (Dagster's), without importing Dagster here
    from atlas_dagster.assets.common import Log

# References a policy names: created before the policies that use them.
REFERENCE_CONTRACTS = ("scope_tags", "assignment_filters")


@dataclass(frozen=True)
class Selection:
    """What a plan restores of its set: contract keys or policy types, source ids, and whether
    conditional access keeps the backed-up state."""

    types: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    keep_ca_state: bool = False

    def scope(self, backup_set_id: int) -> str:
        """The plan's identity within its target connection (the ledger's target_scope)."""
        return "restore:" + canonical_json(
            {
                "set": backup_set_id,
                "types": sorted(self.types),
                "items": sorted(self.items),
                "keep_ca_state": self.keep_ca_state,
            }
        )

    @classmethod
    def from_scope(cls, scope: str) -> tuple[int, Selection]:
        data = json.loads(scope.removeprefix("restore:"))
        return int(data["set"]), cls(
            tuple(data["types"]), tuple(data["items"]), bool(data["keep_ca_state"])
        )


@dataclass
class PlanResult:
    plan_id: int
    items: list[dict[str, Any]]
    summary: dict[str, int]


def writable(contract_key: str) -> bool:
    return CONTRACTS[contract_key].writes is not None


def _order(contract_key: str) -> int:
    keys = (*REFERENCE_CONTRACTS, *POLICY_CONTRACTS)
    return keys.index(contract_key)


def _load_backup(
    engine: Engine, set_id: int, selection: Selection
) -> tuple[list[Backed], dict[str, dict[str, Any]]]:
    """The selected items of a set, and every item of the reference types by id (a policy may
    name a scope tag or filter the selection leaves out)."""
    stored = set_items(engine, set_id)
    payloads = load_payloads(
        engine,
        [i.content_hash for i in stored.values()]
        + [i.assignment_names_hash for i in stored.values() if i.assignment_names_hash],
    )
    wanted_types = set(selection.types)
    wanted_ids = set(selection.items)
    out: list[Backed] = []
    references: dict[str, dict[str, Any]] = {}
    for (key, external_id), item in sorted(stored.items()):
        if key not in CONTRACTS:
            continue
        obj = json.loads(payloads[item.content_hash])
        if key in REFERENCE_CONTRACTS:
            references[f"{key}:{external_id}"] = obj
        if wanted_types and key not in wanted_types and item.policy_type not in wanted_types:
            continue
        if wanted_ids and external_id not in wanted_ids:
            continue
        names = payloads.get(item.assignment_names_hash or "")
        out.append(
            Backed(
                CONTRACTS[key],
                external_id,
                obj,
                json.loads(names) if names else None,
                item.display_name,
            )
        )
    return out, references


class Planner:
    """Builds one plan: the target read live, each backed-up item matched, mapped and diffed."""

    def __init__(
        self,
        client: GraphClient,
        engine: Engine,
        *,
        connection_id: int,
        source_connection_id: int,
        source_tenant_id: str | None,
        log: Log,
        source_client: GraphClient | None = None,
    ):
        self.client = client
        self.engine = engine
        self.connection_id = connection_id
        self.source_connection_id = source_connection_id
        self.source_tenant_id = source_tenant_id
        self._templates: dict[str, dict[str, Any] | None] = {}
        self.references = ReferenceMapper(
            client,
            engine,
            connection_id=connection_id,
            source_connection_id=source_connection_id,
            source_client=source_client,
            log=log,
        )
        self.log = log

    def plan(self, set_id: int, selection: Selection, operation_run_id: int | None) -> PlanResult:
        backup = require_set(self.engine, set_id)
        if backup.status not in (SET_COMPLETE, SET_PARTIAL):
            raise AtlasError(
                RESTORE_UNSUPPORTED,
                f"backup set #{set_id} is {backup.status}: only a complete or partial set can "
                "be restored",
            )
        claims = self.client.token_claims()
        tenant = str(claims.get("tid") or self.client.connection.tenant_id or "")
        roles = [str(r) for r in claims.get("roles") or ()]
        same_tenant = bool(self.source_tenant_id) and tenant == self.source_tenant_id
        backed, backed_refs = _load_backup(self.engine, set_id, selection)
        unknown = [b for b in backed if not writable(b.contract.key)]
        backed = [b for b in backed if writable(b.contract.key)]
        keys = sorted({b.contract.key for b in backed} | set(REFERENCE_CONTRACTS), key=_order)
        targets, read_errors = self._read_targets(keys)
        refs = self.references.map(backed, backed_refs, targets, same_tenant)
        items: list[dict[str, Any]] = []
        for key in keys:
            mine = [b for b in backed if b.contract.key == key]
            if not mine:
                continue
            if key in read_errors:
                err = read_errors[key]
                items += [
                    self._row(b, rules.BLOCKED, reason=err.reason_code, message=err.message)
                    for b in mine
                ]
                continue
            matches = rules.match_items(
                CONTRACTS[key],
                [m.obj for m in mine],
                targets[key],
                same_tenant=same_tenant,
            )
            for b, match in zip(mine, matches, strict=True):
                items.append(self._item(b, match, refs, roles, selection))
        for b in unknown:
            items.append(
                self._row(
                    b,
                    rules.SKIP,
                    reason=RESTORE_UNSUPPORTED,
                    message=f"Graph takes no writes of {b.contract.title or b.contract.key}",
                )
            )
        for position, item in enumerate(items):
            item["position"] = position
        summary = _plan_summary(items)
        plan_id = plans.save_plan(
            self.engine,
            backup_set_id=set_id,
            source_connection_id=self.source_connection_id,
            connection_id=self.connection_id,
            target_tenant_id=tenant,
            selection={"types": list(selection.types), "items": list(selection.items)},
            options={"keep_ca_state": selection.keep_ca_state, "same_tenant": same_tenant},
            operation_run_id=operation_run_id,
            items=items,
            summary=summary,
        )
        return PlanResult(plan_id, items, summary)

    def _read_targets(
        self, keys: list[str]
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, GraphError]]:
        targets: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, GraphError] = {}
        with self.client.policy_reads(keys) as reads:
            for read in reads:
                if read.error is not None:
                    if read.error.reason_code in FATAL_FOR_ALL_TYPES:
                        raise read.error
                    errors[read.contract_key] = read.error
                targets[read.contract_key] = read.objects
        return targets, errors

    def _row(
        self,
        b: Backed,
        action: str,
        *,
        target_id: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        changes: list[dict[str, Any]] | None = None,
        writes: list[dict[str, Any]] | None = None,
        target_hash: str | None = None,
        planned_view: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "planned_view": planned_view,
            "contract_key": b.contract.key,
            "policy_type": classify(b.contract, b.obj).policy_type,
            "display_name": b.display_name,
            "source_external_id": b.external_id,
            "target_external_id": target_id,
            "action": action,
            "reason_code": reason,
            "message": message,
            "changes": changes or [],
            "writes": writes or [],
            "target_hash_at_plan": target_hash,
        }

    def _item(
        self,
        b: Backed,
        match: rules.Match,
        refs: rules.References,
        roles: list[str],
        selection: Selection,
    ) -> dict[str, Any]:
        contract = b.contract
        target = match.target
        target_id = str(target["id"]) if target is not None else None
        current = rules.view(contract, target) if target is not None else None
        target_hash = rules.view_hash(contract, current) if current is not None else None
        if match.skipped:
            return self._row(b, rules.SKIP, reason=RESTORE_UNSUPPORTED, message=match.skipped)
        if match.blocked:
            return self._row(b, rules.BLOCKED, reason=RESTORE_CONFLICT, message=match.blocked)
        mapped = rules.map_references(contract, b.obj, refs)
        wanted_obj = mapped.obj
        notes: list[str] = []
        if contract.key == "conditional_access_policies":
            note = rules.hold_ca_state(wanted_obj, target, selection.keep_ca_state)
            if note:
                notes.append(note)
        wanted = rules.view(contract, wanted_obj)
        if current is not None and canonical_json(current) == canonical_json(wanted):
            return self._row(
                b,
                rules.UNCHANGED,
                target_id=target_id,
                message="; ".join(notes) or None,
                target_hash=target_hash,
            )
        action = rules.UPDATE if target is not None else rules.CREATE
        changes = rules.changes(current, wanted) if current is not None else []
        common = {"target_id": target_id, "changes": changes, "target_hash": target_hash}
        skip = restore_skip(contract, b.obj)
        if skip is None and target is None and contract.writes and contract.writes.create is None:
            skip = (RESTORE_UNSUPPORTED, f"Graph cannot create {contract.title or contract.key}")
        if skip is None and target is None:
            skip = self._template_refusal(contract, b.obj)
        if skip is not None:
            return self._row(b, rules.SKIP, reason=skip[0], message=skip[1], **common)
        if mapped.problems:
            reason, _ = mapped.problems[0]
            message = "; ".join(m for _, m in mapped.problems)
            return self._row(b, rules.BLOCKED, reason=reason, message=message, **common)
        planned = rules.plan_writes(
            contract,
            wanted,
            current,
            target,
            graph_base=self.client.connection.graph_base_url,
            source_obj=b.obj,
        )
        if planned.left:
            notes.append(
                "Graph does not take "
                + ", ".join(planned.left)
                + f" for this object ({contract.writes.builtin_why if contract.writes else ''})"
            )
            if not planned.writes:
                return self._row(
                    b, rules.SKIP, reason=RESTORE_UNSUPPORTED, message="; ".join(notes), **common
                )
        needed = sorted({p for w in planned.writes for p in CONTRACTS[w.contract_key].permissions})
        lacking = missing_permissions(needed, roles)
        if lacking:
            return self._row(
                b,
                rules.BLOCKED,
                reason=PROVIDER_PERMISSION_DENIED,
                message=f"the app registration lacks {', '.join(lacking)}",
                **common,
            )
        return self._row(
            b,
            action,
            message="; ".join(notes) or None,
            writes=[w.to_dict() for w in planned.writes],
            planned_view=wanted,
            **common,
        )

    def _template(self, contract_key: str, template_id: str) -> dict[str, Any] | None:
        """A template by id, read once per plan however many deleted objects were made from
        it; None when Graph has no such template."""
        if template_id not in self._templates:
            try:
                found = dict(self.client.read_details(contract_key, [template_id]))
                self._templates[template_id] = found.get(template_id) or {}
            except GraphError as exc:
                if exc.status != 404:
                    raise
                self._templates[template_id] = None
        return self._templates[template_id]

    def _template_refusal(
        self, contract: Contract, obj: Mapping[str, Any]
    ) -> tuple[str, str] | None:
        check = contract.writes.create_requires if contract.writes else None
        if check is None:
            return None
        template_id = obj.get(check.id_from)
        if not template_id:
            return RESTORE_UNSUPPORTED, f"the backup names no {check.id_from}"
        template = self._template(check.contract, str(template_id))
        if template is None:
            return RESTORE_UNSUPPORTED, f"the template {template_id} no longer exists"
        if template.get(check.field) == check.refused:
            return (
                RESTORE_UNSUPPORTED,
                f"the template {template.get('displayName') or template_id} is deprecated: "
                "Graph creates no new intents from it",
            )
        return None


def _plan_summary(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {
        a: 0 for a in (rules.CREATE, rules.UPDATE, rules.UNCHANGED, rules.SKIP, rules.BLOCKED)
    }
    held = 0
    writes = 0
    for item in items:
        counts[item["action"]] += 1
        writes += len(item.get("writes") or ())
        if item["action"] == rules.UNCHANGED and item.get("message"):
            held += 1
    return {**counts, "held_report_only": held, "planned_writes": writes}
