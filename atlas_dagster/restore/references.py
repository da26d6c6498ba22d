"""Where the ids a backup names point in the target tenant (DESIGN §9, order and references):
groups from the target's cached directory (refreshed first), assignment filters and scope tags
from the plan's live read, and the users and named locations conditional access names, looked
up in both tenants. Each maps by id, else by exactly one display name; anything else becomes the
item's reason to be blocked (``References.why_not``), never a guess."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.graph import GraphClient
from atlas_dagster.reasons import FATAL_FOR_ALL_TYPES, GraphError
from atlas_dagster.restore import rules
from graph_contracts import CONTRACTS, Contract, object_name, odata_eq

if TYPE_CHECKING:  # the assets' log (Dagster's), without importing Dagster here
    from atlas_dagster.assets.common import Log


@dataclass
class Backed:
    """A backed-up item as a plan reads it."""

    contract: Contract
    external_id: str
    obj: dict[str, Any]
    names: dict[str, Any] | None
    display_name: str | None


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


def _referenced_groups(backed: Iterable[Backed]) -> dict[str, str | None]:
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


def _filter_names(backed: Iterable[Backed]) -> dict[str, str]:
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


@dataclass
class ReferenceMapper:
    """Maps the references of one plan's items into its target. ``source_client`` is the
    backup's own tenant, when that is another and still configured: where the names of the
    users and named locations its policies name are read."""

    client: GraphClient
    engine: Engine
    connection_id: int
    source_connection_id: int
    source_client: GraphClient | None
    log: Log

    def map(
        self,
        backed: list[Backed],
        backed_refs: Mapping[str, dict[str, Any]],
        targets: Mapping[str, list[dict[str, Any]]],
        same_tenant: bool,
    ) -> rules.References:
        """Where every id the backed-up items name points in the target (``backed_refs``: the
        set's filters and scope tags by ``key:id``; ``targets``: the target's, read live)."""
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

    def _map_locations(self, backed: list[Backed], refs: rules.References) -> None:
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

    def _map_users(self, backed: list[Backed], refs: rules.References) -> None:
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
