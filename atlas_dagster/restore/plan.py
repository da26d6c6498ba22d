"""A restore plan (``restore.plan``): the target tenant read live, each backed-up item matched,
mapped and compared, and what an execution would write stored with it. It only reads the
tenant (DESIGN §9)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema
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
    object_name,
    odata_eq,
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


@dataclass
class _Backed:
    contract: Contract
    external_id: str
    obj: dict[str, Any]
    names: dict[str, Any] | None
    display_name: str | None


def _load_backup(
    engine: Engine, set_id: int, selection: Selection
) -> tuple[list[_Backed], dict[str, dict[str, Any]]]:
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
    out: list[_Backed] = []
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
            _Backed(
                CONTRACTS[key],
                external_id,
                obj,
                json.loads(names) if names else None,
                item.display_name,
            )
        )
    return out, references


def _groups(engine: Engine, conn_id: int) -> tuple[set[str], dict[str, list[str]], dict[str, str]]:
    """A connection's cached active groups: ids, ids by display name, names by id."""
    g = schema.directory_groups
    ids: set[str] = set()
    by_name: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(g.c.group_id, g.c.display_name, g.c.deleted_at).where(
                g.c.provider_connection_id == conn_id
            )
        )
        for r in rows:
            if r.display_name is not None:
                names[r.group_id] = r.display_name
            if r.deleted_at is None:
                ids.add(r.group_id)
                by_name.setdefault(r.display_name, []).append(r.group_id)
    return ids, by_name, names


def _referenced_groups(backed: Iterable[_Backed]) -> dict[str, str | None]:
    """Every group id the items name, with its name from the backup where it holds one."""
    out: dict[str, str | None] = {}
    for b in backed:
        for row in (b.names or {}).get("assignments") or ():
            if row.get("group_id"):
                out[row["group_id"]] = row.get("group_name") or out.get(row["group_id"])
        for a in rules.direct_assignments(b.obj):
            group = (a.get("target") or {}).get("groupId")
            if group:
                out.setdefault(group, None)
        users = ((b.obj.get("conditions") or {}).get("users")) or {}
        for key in ("includeGroups", "excludeGroups"):
            for group in users.get(key) or ():
                out.setdefault(group, None)
        for role in b.obj.get("roleAssignments") or ():
            for key in ("members", "resourceScopes"):
                for group in role.get(key) or ():
                    if group != "/":
                        out.setdefault(group, None)
    return out


def _filter_names(backed: Iterable[_Backed]) -> dict[str, str]:
    out: dict[str, str] = {}
    for b in backed:
        for row in (b.names or {}).get("assignments") or ():
            if row.get("filter_id") and row.get("filter_name"):
                out[row["filter_id"]] = row["filter_name"]
    return out


def _map_by_name(
    kind: str,
    source_id: str,
    name: str | None,
    target_ids: set[str],
    by_name: Mapping[str, list[str]],
    refs: rules.References,
    table: dict[str, str],
    created_here: str | None = None,
) -> None:
    if source_id in target_ids:
        table[source_id] = source_id
    elif name is not None and len(by_name.get(name, ())) == 1:
        table[source_id] = by_name[name][0]
    elif name is not None and len(by_name.get(name, ())) > 1:
        refs.why_not[source_id] = (
            f"{len(by_name[name])} {kind}s in the target are named {name!r}: never a guess"
        )
    elif created_here is not None:
        table[source_id] = created_here
    elif name is None:
        refs.why_not[source_id] = (
            f"{kind} {source_id} is not in the target, and its name is unknown"
        )
    else:
        refs.why_not[source_id] = f"no {kind} named {name!r} in the target"


def _named_locations(client: GraphClient) -> dict[str, str]:
    """A tenant's named locations: id → display name."""
    return {
        str(o["id"]): str(o.get("displayName") or "")
        for page in client.pages("named_locations")
        for o in page
        if o.get("id")
    }


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
        # The backup's own tenant, when it is another and still configured: where the names
        # of the users and named locations its policies name are read.
        self.source_client = source_client
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
        refs = self._references(backed, backed_refs, targets, same_tenant)
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

    def _references(
        self,
        backed: list[_Backed],
        backed_refs: Mapping[str, dict[str, Any]],
        targets: Mapping[str, list[dict[str, Any]]],
        same_tenant: bool,
    ) -> rules.References:
        from atlas_dagster.assets.directory_groups import run_groups_sync

        refs = rules.References(same_tenant=same_tenant)
        # The target's groups as they are now (a delta round: cheap when the cache is warm).
        run_groups_sync(self.engine, self.client, self.connection_id, self.log)
        group_ids, groups_by_name, _ = _groups(self.engine, self.connection_id)
        _, _, source_names = _groups(self.engine, self.source_connection_id)
        for group, name in _referenced_groups(backed).items():
            _map_by_name(
                "group",
                group,
                name or source_names.get(group),
                group_ids,
                groups_by_name,
                refs,
                refs.groups,
            )
        self._map_locations(backed, refs)
        self._map_users(backed, refs)
        restored = {(b.contract.key, b.external_id) for b in backed}
        filter_names = _filter_names(backed)
        for key, table in (("assignment_filters", refs.filters), ("scope_tags", refs.scope_tags)):
            contract = CONTRACTS[key]
            live = targets.get(key, [])
            ids = {str(t.get("id")) for t in live}
            by_name: dict[str, list[str]] = {}
            for t in live:
                by_name.setdefault(object_name(contract, t) or "", []).append(str(t.get("id")))
            wanted: set[str] = set()
            for b in backed:
                if key == "scope_tags":
                    wanted.update(str(v) for v in b.obj.get("roleScopeTagIds") or ())
                else:
                    for a in rules.direct_assignments(b.obj):
                        fid = (a.get("target") or {}).get(
                            "deviceAndAppManagementAssignmentFilterId"
                        )
                        if fid not in rules.NO_FILTER:
                            wanted.add(str(fid))
            for source_id in wanted:
                obj = backed_refs.get(f"{key}:{source_id}")
                name = object_name(contract, obj) if obj else filter_names.get(source_id)
                created_here = (
                    rules.placeholder(key, source_id) if (key, source_id) in restored else None
                )
                _map_by_name(
                    "assignment filter" if key == "assignment_filters" else "scope tag",
                    source_id,
                    name,
                    ids if same_tenant or source_id == "0" else set(),
                    by_name,
                    refs,
                    table,
                    created_here,
                )
        return refs

    def _map_locations(self, backed: list[_Backed], refs: rules.References) -> None:
        """Named locations map like groups: the same id where the target has it, else the one
        target location of the source's name. Read only when a policy names one."""
        wanted = sorted({v for b in backed for v in rules.ca_references(b.obj, "named location")})
        if not wanted:
            return
        try:
            live = _named_locations(self.client)
        except GraphError as exc:
            if exc.reason_code in FATAL_FOR_ALL_TYPES:
                raise
            for source_id in wanted:
                refs.why_not[source_id] = f"the target's named locations: {exc.message}"
            return
        by_name: dict[str, list[str]] = {}
        for location_id, name in live.items():
            by_name.setdefault(name, []).append(location_id)
        names: dict[str, str] = {}
        if self.source_client is not None and not set(wanted) <= live.keys():
            try:
                names = _named_locations(self.source_client)
            except GraphError as exc:
                # Only these names are lost: their policies are blocked, the rest is planned.
                self.log.info(f"the source tenant's named locations: {exc.message}")
        for source_id in wanted:
            _map_by_name(
                "named location",
                source_id,
                names.get(source_id),
                set(live),
                by_name,
                refs,
                refs.locations,
            )

    def _map_users(self, backed: list[_Backed], refs: rules.References) -> None:
        """Users map like groups, each looked up on its own (a directory is never listed): the
        same id where the target has it, else the one target user with the source user's
        display name."""
        wanted = sorted({v for b in backed for v in rules.ca_references(b.obj, "user")})
        for source_id in wanted:
            try:
                if self.client.read_object("users", source_id) is not None:
                    refs.users[source_id] = source_id
                    continue
            except GraphError as exc:
                if exc.reason_code in FATAL_FOR_ALL_TYPES:
                    raise
                if refs.same_tenant:
                    # Its own tenant's id stays what it was (Graph checks it on the write); an
                    # app without User.Read.All loses only the check.
                    refs.users[source_id] = source_id
                else:
                    refs.why_not[source_id] = f"user {source_id} in the target: {exc.message}"
                continue
            name = self._source_user_name(source_id)
            found: list[str] = []
            if name is not None:
                where = odata_eq("displayName", name)
                try:
                    found = [
                        str(u["id"])
                        for page in self.client.pages("users", where=where)
                        for u in page
                    ]
                except GraphError as exc:
                    if exc.reason_code in FATAL_FOR_ALL_TYPES:
                        raise
                    refs.why_not[source_id] = f"users named {name!r} in the target: {exc.message}"
                    continue
            _map_by_name("user", source_id, name, set(), {name or "": found}, refs, refs.users)

    def _source_user_name(self, user_id: str) -> str | None:
        if self.source_client is None:
            return None
        try:
            user = self.source_client.read_object("users", user_id)
        except GraphError as exc:
            self.log.info(f"user {user_id} in the source tenant: {exc.message}")
            return None
        return str(user["displayName"]) if user and user.get("displayName") else None

    def _row(
        self,
        b: _Backed,
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
        b: _Backed,
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

    def _template_refusal(
        self, contract: Contract, obj: Mapping[str, Any]
    ) -> tuple[str, str] | None:
        check = contract.writes.create_requires if contract.writes else None
        if check is None:
            return None
        template_id = obj.get(check.id_from)
        if not template_id:
            return RESTORE_UNSUPPORTED, f"the backup names no {check.id_from}"
        try:
            found = dict(self.client.read_details(check.contract, [str(template_id)]))
        except GraphError as exc:
            if exc.status == 404:
                return RESTORE_UNSUPPORTED, f"the template {template_id} no longer exists"
            raise
        template = found.get(str(template_id)) or {}
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
