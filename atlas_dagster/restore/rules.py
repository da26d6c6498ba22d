"""What a restore decides, as pure functions over backed-up and live objects (DESIGN §9).

An object's *restorable view* is what a restore can write of it: the top-level fields Graph takes
(without what Graph sets), each piece of nested content its writes carry (element ids and
read-only expansions left out, catalogue objects kept by id) and its direct assignments. Two
objects are equal for a restore when their views are; a plan's field-level changes are the
differences of the views, and the writes an item takes follow from which parts differ.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atlas_dagster.reasons import RESTORE_GROUP_UNMAPPED, RESTORE_REFERENCE_UNMAPPED
from atlas_dagster.stores.backup_diff import field_diff
from graph_contracts import (
    COMMON_VOLATILE,
    Contract,
    Write,
    allowed_writes,
    canonical_json,
    content_hash,
    is_builtin,
    object_name,
    policy_writes,
)

# Actions of a plan's items, and results of an execution's.
CREATE, UPDATE, UNCHANGED, SKIP, BLOCKED = "create", "update", "unchanged", "skip", "blocked"
# A placeholder for the id of an object this execution creates first (a scope tag or filter a
# policy uses): ``atlas-ref:<contract>:<source id>``, replaced before the write is sent.
REF_PREFIX = "atlas-ref:"

# Fields of nested elements that Graph sets or expands on its own.
_ELEMENT_SERVER_SET = frozenset(
    {
        "id",
        "createdDateTime",
        "lastModifiedDateTime",
        "modifiedDateTime",
        "version",
        "settingDefinitions",
        "source",
        "sourceId",
    }
)
# Catalogue objects an element names (Microsoft's, the same in every tenant): kept by id.
_CATALOGUE_REFS = frozenset({"definition", "presentation"})
# How elements of nested content written one by one, or as a delta, are told apart.
ELEMENT_KEYS = {
    "definitionValues": "definition.id",
    "items": "payloadId",
    "localizedNotificationMessages": "locale",
    "roleAssignments": "displayName",
    "assignments": "target",
    "settings": "definitionId",
}
# Assignments a policy set gives: never rewritten as direct ones.
POLICY_SET_SOURCE = "policySets"
CA_ENABLED, CA_REPORT_ONLY = "enabled", "enabledForReportingButNotEnforced"
# Values in a conditional access policy that name no tenant object.
_CA_KEYWORDS = frozenset({"All", "None", "GuestsOrExternalUsers", "AllTrusted"})
# What an assignment target names when it has no filter.
NO_FILTER = (None, "", "00000000-0000-0000-0000-000000000000")


def content_parts(contract: Contract) -> dict[str, list[Write]]:
    """The view's keys that nested writes carry, with the writes that carry each."""
    parts: dict[str, list[Write]] = {}
    writes = policy_writes(contract)
    for write in (writes.assign, *writes.nested):
        if write is not None and write.source:
            parts.setdefault(write.source, []).append(write)
    for source, _ in writes.create_inline:
        parts.setdefault(source, [])
    return parts


def _lookup(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _element(value: Any) -> Any:
    if isinstance(value, list):
        return [_element(v) for v in value]
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in _ELEMENT_SERVER_SET or ("@odata." in key and not key.endswith("@odata.type")):
            continue
        if key in _CATALOGUE_REFS and isinstance(item, Mapping):
            out[key] = {"id": item.get("id")}
        else:
            out[key] = _element(item)
    return out


# Where a conditional access policy names users and named locations by id: (the holder under
# ``conditions``, its lists).
CA_REFERENCES = {
    "user": ("users", ("includeUsers", "excludeUsers")),
    "named location": ("locations", ("includeLocations", "excludeLocations")),
}


def ca_references(obj: Mapping[str, Any], kind: str) -> set[str]:
    """The users or named locations (``kind`` of CA_REFERENCES) a conditional access policy
    includes or excludes by id (keywords such as ``All`` are not ids)."""
    holder_key, keys = CA_REFERENCES[kind]
    holder = (obj.get("conditions") or {}).get(holder_key) or {}
    return {
        v
        for key in keys
        for v in holder.get(key) or ()
        if isinstance(v, str) and v not in _CA_KEYWORDS
    }


def direct_assignments(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        a
        for a in obj.get("assignments") or ()
        if isinstance(a, Mapping) and a.get("source") != POLICY_SET_SOURCE
    ]


def view(contract: Contract, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The restorable view of ``obj``: what a restore writes of it, nothing Graph sets."""
    writes = policy_writes(contract)
    parts = content_parts(contract)
    skip = (
        set(writes.read_only)
        | set(COMMON_VOLATILE)
        | set(contract.volatile_fields)
        | set(parts)
        | {d.key for d in contract.details}
        | {"assignments"}
    )
    out: dict[str, Any] = {}
    for key, value in obj.items():
        # Null and absent are one thing: a listing may leave out what an item read returns.
        # (Values are shared with ``obj``, not copied: a view is only read.)
        if key in skip or value is None or ("@odata." in key and key != "@odata.type"):
            continue
        out[key] = value
    for source in parts:
        if source == "assignments":
            out[source] = _sorted(_element(direct_assignments(obj)))
        elif isinstance(obj.get(source), list):
            out[source] = _sorted(_element(obj[source]))
        elif obj.get(source) is not None:
            out[source] = obj[source]
    return out


def _sorted(items: list[Any]) -> list[Any]:
    return sorted(items, key=canonical_json)


def view_hash(contract: Contract, viewed: Mapping[str, Any]) -> str:
    """The hash of a view (see :func:`view`) that a plan records of its target and an execution
    compares before writing: body, nested content and assignments (Intune has no ETags)."""
    return content_hash(contract, viewed)


def changes(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Field-level changes that turn the view ``current`` into ``wanted``."""
    return [
        {"path": c.path, "kind": c.kind, "before": c.before, "after": c.after}
        for c in field_diff(dict(current), dict(wanted))
    ]


# --- references ---------------------------------------------------------------------------------


@dataclass
class References:
    """Where the ids a backed-up object names point in the target tenant.

    ``groups``/``filters``/``scope_tags``/``users``/``locations`` (the last two named by
    conditional access policies) map a source id to the target's id (or a placeholder for an
    object this restore creates first); ``why_not`` says why an id has no target.
    Same-tenant restores keep ids that exist in the target; names are matched only when an id
    is gone, and never guessed when several target objects share the name."""

    same_tenant: bool
    groups: dict[str, str] = field(default_factory=dict)
    filters: dict[str, str] = field(default_factory=dict)
    scope_tags: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    locations: dict[str, str] = field(default_factory=dict)
    why_not: dict[str, str] = field(default_factory=dict)


@dataclass
class Mapped:
    obj: dict[str, Any]
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def map_references(contract: Contract, obj: Mapping[str, Any], refs: References) -> Mapped:
    """``obj`` with every tenant-specific id it names replaced by the target's; what cannot be
    mapped is a problem (reason code, message), and the item is blocked."""
    # Copied where ids are replaced; the rest is shared with ``obj``.
    out = Mapped(dict(obj))
    for key in ("assignments", "roleAssignments", "conditions"):
        if key in out.obj:
            out.obj[key] = copy.deepcopy(out.obj[key])
    seen: set[tuple[str, str]] = set()

    def problem(reason: str, message: str) -> None:
        if (reason, message) not in seen:
            seen.add((reason, message))
            out.problems.append((reason, message))

    def one(kind: str, table: dict[str, str], value: str) -> str:
        if value in table:
            return table[value]
        reason = RESTORE_GROUP_UNMAPPED if kind == "group" else RESTORE_REFERENCE_UNMAPPED
        problem(reason, refs.why_not.get(value) or f"{kind} {value} has no match in the target")
        return value

    def many(kind: str, table: dict[str, str], values: Any) -> Any:
        if not isinstance(values, list):
            return values
        return [one(kind, table, v) if isinstance(v, str) else v for v in values]

    for assignment in direct_assignments(out.obj):
        target = assignment.get("target")
        if not isinstance(target, dict):
            continue
        if target.get("groupId"):
            target["groupId"] = one("group", refs.groups, str(target["groupId"]))
        filter_id = target.get("deviceAndAppManagementAssignmentFilterId")
        if filter_id not in NO_FILTER:
            target["deviceAndAppManagementAssignmentFilterId"] = one(
                "assignment filter", refs.filters, str(filter_id)
            )
    if isinstance(out.obj.get("roleScopeTagIds"), list):
        out.obj["roleScopeTagIds"] = many("scope tag", refs.scope_tags, out.obj["roleScopeTagIds"])
    for role in out.obj.get("roleAssignments") or ():
        if isinstance(role, dict):
            for key in ("members", "resourceScopes"):
                if isinstance(role.get(key), list):
                    role[key] = [
                        one("group", refs.groups, v) if isinstance(v, str) and v != "/" else v
                        for v in role[key]
                    ]
    conditions = out.obj.get("conditions")
    if isinstance(conditions, dict):
        users = conditions.get("users") or {}
        for key in ("includeGroups", "excludeGroups"):
            if isinstance(users.get(key), list):
                users[key] = many("group", refs.groups, users[key])
        for kind, (holder_key, keys) in CA_REFERENCES.items():
            ids = ca_references(out.obj, kind)
            table = refs.users if kind == "user" else refs.locations
            holder = conditions.get(holder_key) or {}
            for key in keys:
                if isinstance(holder.get(key), list):
                    holder[key] = [one(kind, table, v) if v in ids else v for v in holder[key]]
    if contract.key == "policy_sets" and not refs.same_tenant and out.obj.get("items"):
        problem(
            RESTORE_REFERENCE_UNMAPPED,
            "a policy set names policies of the source tenant by id",
        )
    return out


def resolve_placeholders(value: Any, created: Mapping[str, str]) -> tuple[Any, list[str]]:
    """``value`` with each placeholder replaced by the id its object got (``created``: the
    placeholder → id); the placeholders nothing was created for."""
    missing: list[str] = []

    def walk(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(REF_PREFIX):
            if v in created:
                return created[v]
            missing.append(v)
            return v
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value), missing


def placeholder(contract_key: str, source_id: str) -> str:
    return f"{REF_PREFIX}{contract_key}:{source_id}"


# --- conditional access -------------------------------------------------------------------------


def hold_ca_state(
    obj: dict[str, Any], target: Mapping[str, Any] | None, keep_state: bool
) -> str | None:
    """A restore never raises enforcement on its own: ``enabled`` is written as report-only to
    a policy that is not enabled in the target now (or is created), unless the plan keeps the
    state. Returns the note the plan shows, or None."""
    if keep_state or obj.get("state") != CA_ENABLED:
        return None
    if target is not None and target.get("state") == CA_ENABLED:
        return None
    obj["state"] = CA_REPORT_ONLY
    return (
        "held in report-only: the backup has it enabled; enable it in the portal once its "
        "sign-in logs look right (or plan with --keep-ca-state)"
    )


# --- matching -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    target: dict[str, Any] | None
    blocked: str | None = None
    skipped: str | None = None


def _builtin_identity(contract: Contract, obj: Mapping[str, Any]) -> str | None:
    rule = contract.builtin
    object_id = str(obj.get("id", ""))
    if rule is None:
        return None
    suffix = next((s for s in rule.id_suffixes if object_id.endswith(s)), None)
    return suffix or (object_id if is_builtin(contract, obj) else None)


def match_items(
    contract: Contract,
    items: list[Mapping[str, Any]],
    targets: list[dict[str, Any]],
    *,
    same_tenant: bool,
) -> list[Match]:
    """Each backed-up object's target: by id in the same tenant; a built-in object by its
    built-in identity; else by type and display name among the targets no item matched by id.
    Several candidates, or one candidate two items want, block — never a guess."""
    by_id = {str(t.get("id")): t for t in targets}
    matches: list[Match | None] = [None] * len(items)
    claimed: set[str] = set()
    for n, obj in enumerate(items):
        found = by_id.get(str(obj.get("id"))) if same_tenant else None
        identity = _builtin_identity(contract, obj)
        if found is None and identity is not None:
            found = next((t for t in targets if _builtin_identity(contract, t) == identity), None)
            if found is None:
                matches[n] = Match(
                    None, skipped=f"the built-in object {identity} is not in the target"
                )
        if found is not None:
            matches[n] = Match(found)
            claimed.add(str(found.get("id")))
    wanted: dict[str, list[int]] = {}
    for n, obj in enumerate(items):
        if matches[n] is not None:
            continue
        name = object_name(contract, obj)
        candidates = [
            t
            for t in targets
            if str(t.get("id")) not in claimed
            and object_name(contract, t) == name
            and t.get("@odata.type") == obj.get("@odata.type")
        ]
        if len(candidates) > 1:
            matches[n] = Match(
                None,
                blocked=f"{len(candidates)} target objects of this type are named {name!r}: "
                "restore it by id, or rename one",
            )
        elif candidates:
            wanted.setdefault(str(candidates[0].get("id")), []).append(n)
        else:
            matches[n] = Match(None)
    for target_id, wanting in wanted.items():
        for n in wanting:
            matches[n] = (
                Match(by_id[target_id])
                if len(wanting) == 1
                else Match(
                    None,
                    blocked=f"{len(wanting)} backed-up objects are named like target "
                    f"{target_id}: restore them by id",
                )
            )
    return [m or Match(None) for m in matches]


# --- writes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedWrite:
    """One request of an item, as the plan stores it: the write contract, the element it names
    (``sub_id``), the object it names when not the item's own target (``item_id``: a create
    from a template), and its body."""

    contract_key: str
    body: Any
    sub_id: str | None = None
    item_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"contract_key": self.contract_key, "body": self.body}
        if self.sub_id is not None:
            out["sub_id"] = self.sub_id
        if self.item_id is not None:
            out["item_id"] = self.item_id
        return out


def _binds(elements: list[dict[str, Any]], write: Write, root: str) -> list[dict[str, Any]]:
    """Elements as ``write`` takes them: each catalogue object they name (an ADMX definition,
    its presentation) as ``<name>@odata.bind`` to its URL under ``root``."""
    paths = dict(write.binds)

    def bind(element: dict[str, Any], definition: str | None) -> dict[str, Any]:
        element = copy.deepcopy(element)
        for name, path in paths.items():
            bound = element.get(name)
            if isinstance(bound, Mapping) and bound.get("id"):
                del element[name]
                url = path.format(id=bound["id"], definition=definition)
                element[f"{name}@odata.bind"] = root + url
        for key, value in list(element.items()):
            if isinstance(value, list):
                element[key] = [bind(v, definition) if isinstance(v, dict) else v for v in value]
        return element

    return [bind(e, (e.get("definition") or {}).get("id")) for e in elements]


def _key(element: Any, source: str) -> str:
    return canonical_json(_lookup(element, ELEMENT_KEYS.get(source, "id")))


def _body(contract: Contract, wanted: Mapping[str, Any], *, create: bool) -> dict[str, Any]:
    writes = policy_writes(contract)
    parts = content_parts(contract)
    out = {k: copy.deepcopy(v) for k, v in wanted.items() if k not in parts}
    if not create:
        for key in writes.create_only:
            out.pop(key, None)
    return out


@dataclass
class ItemWrites:
    writes: list[PlannedWrite] = field(default_factory=list)
    # What the restore cannot write of this item, in words (a built-in's fixed parts).
    left: list[str] = field(default_factory=list)


def plan_writes(
    contract: Contract,
    wanted: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    target_obj: Mapping[str, Any] | None,
    *,
    graph_base: str,
    source_obj: Mapping[str, Any],
) -> ItemWrites:
    """The writes that make the target's view ``current`` (None: create) equal ``wanted``:
    one per changed body (a PUT that replaces nested content carries the body too), one per
    changed piece of nested content in the way Graph writes it, one per changed assignment set.
    ``target_obj`` (the live object) names elements Graph gave ids, and which writes a built-in
    object takes."""
    writes = policy_writes(contract)
    out = ItemWrites()
    allowed = set(allowed_writes(contract, target_obj or source_obj))
    parts = content_parts(contract)
    inline = dict(writes.create_inline)
    if current is None:
        assert writes.create is not None
        body = _body(contract, wanted, create=True)
        for source, key in writes.create_inline:
            body[key] = copy.deepcopy(wanted.get(source) or [])
        item_id = str(source_obj.get(writes.create.id_from)) if writes.create.id_from else None
        create_key = f"{contract.key}.{writes.create.name}"
        out.writes.append(PlannedWrite(create_key, body, item_id=item_id))
        # What the create leaves: the body and the inline content as wanted, the rest empty.
        current = {k: v for k, v in wanted.items() if k not in parts or k in inline}
        current.update({k: [] for k in parts if k not in inline})
        target_obj = {}
    body_changed = _body(contract, wanted, create=False) != _body(contract, current, create=False)
    replace = next((w for w in writes.nested if w.effect == "replace"), None)
    replaced = False
    # A PUT carries the body too, but only nested content that changed needs one.
    if replace is not None and canonical_json(wanted.get(replace.source)) != canonical_json(
        current.get(replace.source)
    ):
        body = _body(contract, wanted, create=False)
        body[replace.body_key or replace.source] = copy.deepcopy(wanted.get(replace.source) or [])
        out.writes.append(PlannedWrite(f"{contract.key}.{replace.name}", body))
        replaced = True
    elif body_changed and writes.update is not None:
        body = _body(contract, wanted, create=False)
        # A field the backup leaves empty is cleared: PATCH keeps what it does not name.
        cleared = _body(contract, current, create=False).keys() - body.keys()
        out.writes.append(
            PlannedWrite(f"{contract.key}.update", {**body, **dict.fromkeys(sorted(cleared))})
        )
    for source, part_writes in parts.items():
        if replaced and replace is not None and source == replace.source:
            continue
        want, have = wanted.get(source), current.get(source)
        if canonical_json(want) == canonical_json(have) or not part_writes:
            continue
        out.writes.extend(
            _content_writes(contract, source, part_writes, want, have, target_obj, graph_base)
        )
    for write in out.writes:
        name = write.contract_key.removeprefix(f"{contract.key}.")
        if not any(w.name == name for w in allowed):
            out.left.append(name)
    if out.left:
        out.writes = [
            w
            for w in out.writes
            if any(w.contract_key == f"{contract.key}.{a.name}" for a in allowed)
        ]
    return out


def _content_writes(
    contract: Contract,
    source: str,
    part_writes: list[Write],
    want: Any,
    have: Any,
    target_obj: Mapping[str, Any] | None,
    graph_base: str,
) -> list[PlannedWrite]:
    key = contract.key
    by_effect = {w.effect: w for w in part_writes}
    want_list = want if isinstance(want, list) else []
    have_list = have if isinstance(have, list) else []
    if "set" in by_effect:
        w = by_effect["set"]
        return [PlannedWrite(f"{key}.{w.name}", {w.body_key: copy.deepcopy(want_list)})]
    if "field" in by_effect:
        w = by_effect["field"]
        return [PlannedWrite(f"{key}.{w.name}", {w.body_key: copy.deepcopy(want)})]
    live = {
        _key(_element(e), source): e
        for e in ((target_obj or {}).get(source) or ())
        if isinstance(e, Mapping)
    }
    old = {_key(e, source): e for e in have_list}
    new = {_key(e, source): e for e in want_list}
    added = [e for k, e in new.items() if k not in old]
    changed = [
        (k, e) for k, e in new.items() if k in old and canonical_json(old[k]) != canonical_json(e)
    ]
    removed = [k for k in old if k not in new]
    if "merge" in by_effect:
        w = by_effect["merge"]
        return [PlannedWrite(f"{key}.{w.name}", {w.body_key: [*added, *(e for _, e in changed)]})]
    if "delta" in by_effect:
        w = by_effect["delta"]
        added_key, updated_key, deleted_key = w.delta_keys
        root = f"{graph_base.rstrip('/')}/{contract.api_version}"
        updated = []
        for k, element in changed:
            element = dict(element)
            element["id"] = (live.get(k) or {}).get("id")
            updated.append(element)
        body = {
            added_key: _binds(added, w, root),
            updated_key: _binds(updated, w, root),
            deleted_key: [(live.get(k) or {}).get("id") for k in removed],
        }
        return [PlannedWrite(f"{key}.{w.name}", body)]
    out: list[PlannedWrite] = []
    add = by_effect.get("append")
    patch = by_effect.get("patch_element")
    remove = next((w for w in contract.writes.nested if w.effect == "remove_element" and w.source == source), None) if contract.writes else None  # fmt: skip
    for element in added:
        if add is not None:
            out.append(PlannedWrite(f"{key}.{add.name}", copy.deepcopy(element)))
    for k, element in changed:
        sub_id = (live.get(k) or {}).get("id")
        if patch is not None and sub_id:
            out.append(
                PlannedWrite(f"{key}.{patch.name}", copy.deepcopy(element), sub_id=str(sub_id))
            )
        elif add is not None and remove is not None and sub_id:
            out.append(PlannedWrite(f"{key}.{remove.name}", None, sub_id=str(sub_id)))
            out.append(PlannedWrite(f"{key}.{add.name}", copy.deepcopy(element)))
    for k in removed:
        sub_id = (live.get(k) or {}).get("id")
        if remove is not None and sub_id:
            out.append(PlannedWrite(f"{key}.{remove.name}", None, sub_id=str(sub_id)))
    return out
