"""Graph's writes applied to a simulated tenant, as the write contracts of ``graph_contracts``
describe them: each write's effect (create, patch, replace, set, …) on the object it targets,
server-set ids and stamps, built-in objects that refuse writes, and Intune's write throttling.

Nothing here branches on a policy type: what a write does comes from its contract."""

from __future__ import annotations

import copy
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from atlas_dagster.simulator import payloads as p
from atlas_dagster.simulator.odata import NAVIGATION, Shape, shape
from atlas_dagster.simulator.tenant import SimulatedTenant
from graph_contracts import CONTRACTS, Contract, Write, WriteContract, allowed_writes

WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# Objects Microsoft defines, the same in every tenant, by the read contract that fetches them.
REFERENCE_OBJECTS: dict[str, dict[str, dict[str, Any]]] = {
    "endpoint_security_templates.item": p.TEMPLATES
}
# What ``<name>@odata.bind`` can point at, by navigation property: Microsoft's catalogues.
_CATALOGUES: dict[str, dict[str, dict[str, Any]]] = {
    "definition": p.ADMX_DEFINITIONS,
    "presentation": p.ADMX_PRESENTATIONS,
}
# A nested element Graph refuses without this property (after its binds are resolved).
_ELEMENT_NEEDS = {"assignments": "target", "definitionValues": "definition"}
_ENTITY = object()  # "answer with the written object"


class WriteRefused(Exception):
    """A write Graph refuses: the status, Graph's error code and the message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str) -> WriteRefused:
    return WriteRefused(400, "BadRequest", message)


@dataclass
class Written:
    """A write's answer: its status and body (None: no content)."""

    status: int
    body: Any = None


@dataclass
class WriteLimits:
    """Intune's write throttling: at most ``per_app`` writes in any ``window_s`` seconds per app
    and tenant, and ``per_tenant`` for all apps. A write beyond either is refused and not
    counted."""

    per_app: int = 100
    per_tenant: int = 200
    window_s: float = 20.0
    _admitted: deque[tuple[float, str]] = field(default_factory=deque, repr=False)

    def admit(self, app_id: str, now: float) -> float | None:
        """None when the write may go ahead (it is counted), else the seconds until it may."""
        while self._admitted and self._admitted[0][0] <= now - self.window_s:
            self._admitted.popleft()
        mine = [moment for moment, app in self._admitted if app == app_id]
        if len(mine) >= self.per_app:
            return mine[0] + self.window_s - now
        if len(self._admitted) >= self.per_tenant:
            return self._admitted[0][0] + self.window_s - now
        self._admitted.append((now, app_id))
        return None


# --- bodies and elements -------------------------------------------------------------------------


def _content_keys(writes: WriteContract) -> frozenset[str]:
    """Body keys that carry nested content, which only its own writes change."""
    sources = {w.source for w in writes.all if w.source and w.effect != "field"}
    return frozenset(sources | {key for _, key in writes.create_inline} | NAVIGATION)


def _top_level(writes: WriteContract, body: dict[str, Any]) -> dict[str, Any]:
    """The fields a create or update takes: not what Graph sets, not nested content, no OData
    bookkeeping but the type."""
    skip = _content_keys(writes) | set(writes.read_only)
    return {
        key: copy.deepcopy(value)
        for key, value in body.items()
        if key not in skip and (key == "@odata.type" or "@odata." not in key)
    }


def _bound_id(url: str) -> str:
    quoted = re.findall(r"\('([^']*)'\)", url)
    return quoted[-1] if quoted else url.rstrip("/").rsplit("/", 1)[-1]


def _resolve_binds(value: Any) -> Any:
    """``name@odata.bind: url`` becomes the navigation property ``name``: the catalogue's object
    when Graph's catalogue holds it, else a reference by id."""
    if isinstance(value, list):
        return [_resolve_binds(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key.endswith("@odata.bind"):
            name = key.removesuffix("@odata.bind")
            bound = _bound_id(str(item))
            catalogue = _CATALOGUES.get(name)
            if catalogue is not None and bound not in catalogue:
                raise _bad(f"No {name} with id '{bound}' exists.")
            out[name] = copy.deepcopy(catalogue[bound]) if catalogue else {"id": bound}
        else:
            out[key] = _resolve_binds(item)
    return out


def _element(
    tenant: SimulatedTenant,
    policy: Contract,
    source: str,
    item: Any,
    owner_id: str,
    index: int,
    *,
    new: bool = True,
) -> dict[str, Any]:
    """One element of nested content as Graph keeps it: binds resolved, ids Graph's. A ``new``
    element must name what Graph needs of it; a change to an element keeps the rest of it."""
    if not isinstance(item, dict):
        raise _bad(f"'{source}' holds objects, not {type(item).__name__}.")
    item = _resolve_binds(copy.deepcopy(item))
    needed = _ELEMENT_NEEDS.get(source) if new else None
    if needed and not isinstance(item.get(needed), dict):
        raise _bad(f"Each of '{source}' needs its '{needed}'.")
    if source == "assignments":
        # Graph names an assignment after its policy and target, whatever id was sent.
        base = p.make_assignment(policy.key, owner_id, item["target"])
        kept = ("id", "@odata.type", "target", "source", "sourceId")
        return {**base, **{k: v for k, v in item.items() if k not in kept}}
    instance = item.get("settingInstance")
    if isinstance(instance, dict):
        # Settings catalog settings are numbered per policy and come back with their definition.
        definition = instance.get("settingDefinitionId")
        item["id"] = str(index)
        item["settingDefinitions"] = [p.setting_definition(definition)] if definition else []
        return item
    item.setdefault("id", tenant.new_element_id())
    return item


def _elements(
    tenant: SimulatedTenant, policy: Contract, source: str, items: Any, owner_id: str
) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise _bad(f"'{source}' must be a list.")
    return [_element(tenant, policy, source, item, owner_id, n) for n, item in enumerate(items)]


def _entity(obj: dict[str, Any]) -> dict[str, Any]:
    return shape(obj, Shape(), item_read=True)


def _check_create_only(writes: WriteContract, stored: dict[str, Any], changes: dict) -> None:
    for key in writes.create_only:
        if key in changes and changes[key] != stored.get(key):
            raise _bad(f"The property '{key}' cannot be changed once the object exists.")
    if changes.get("@odata.type", stored.get("@odata.type")) != stored.get("@odata.type"):
        raise _bad("An object's @odata.type cannot change.")


# --- create --------------------------------------------------------------------------------------

_SERVER_VALUES: dict[str, Callable[[SimulatedTenant, Contract, dict[str, Any], str], Any]] = {
    "createdDateTime": lambda tenant, policy, obj, now: now,
    "lastModifiedDateTime": lambda tenant, policy, obj, now: now,
    # A new conditional access policy has no modifiedDateTime until its first change.
    "modifiedDateTime": lambda tenant, policy, obj, now: None,
    "version": lambda tenant, policy, obj, now: 1,
    "settingCount": lambda tenant, policy, obj, now: len(obj.get("settings") or ()),
    "isAssigned": lambda tenant, policy, obj, now: False,
    "priority": lambda tenant, policy, obj, now: (
        1 + max((o.get("priority") or 0 for o in tenant.stored_policies(policy.key)), default=0)
    ),
}


def _template_refusal(writes: WriteContract, template_id: str) -> WriteRefused | None:
    check = writes.create_requires
    if check is None:
        return None
    template = REFERENCE_OBJECTS[check.contract].get(template_id)
    if template is None:
        return WriteRefused(404, "ResourceNotFound", f"No template with id '{template_id}'.")
    if template.get(check.field) == check.refused:
        return _bad(f"Template '{template_id}' is deprecated: it creates no new instances.")
    return None


def _create(
    tenant: SimulatedTenant, policy: Contract, write: Write, item_id: str | None, body: dict
) -> Written:
    writes = policy.writes
    assert writes is not None
    types = {rule.odata_type for rule in policy.type_rules}
    if types and body.get("@odata.type") not in types:
        raise _bad(f"Cannot create an abstract class: name one of {policy.key}'s @odata.types.")
    inline = dict(writes.create_inline)
    for needed in writes.create_needs:
        if not body.get(inline.get(needed, needed)):
            raise _bad(f"A {policy.title} object is created with its '{needed}'.")
    obj = _top_level(writes, body)
    if write.id_from is not None:
        assert item_id is not None
        refusal = _template_refusal(writes, item_id)
        if refusal is not None:
            raise refusal
        obj[write.id_from] = item_id
    if "@odata.type" not in obj and not types:
        # A collection of one type: its objects carry that type.
        known = {o.get("@odata.type") for o in tenant.stored_policies(policy.key)}
        if len(known) == 1 and None not in known:
            obj["@odata.type"] = known.pop()
    obj["id"] = tenant.new_policy_id(policy.key)
    for w in writes.all:
        if w.source and w.effect not in ("field", "patch", "create"):
            obj.setdefault(w.source, [])
    for source, key in writes.create_inline:
        obj[source] = _elements(tenant, policy, source, body.get(key) or [], obj["id"])
    now = tenant.now_stamp()
    for name in writes.read_only:
        if name in _SERVER_VALUES and name not in obj:
            obj[name] = _SERVER_VALUES[name](tenant, policy, obj, now)
    tenant.store_policy(policy.key, obj)
    return Written(write.status, _entity(obj))


# --- effects on an existing object ---------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """What a write to an existing object works on: the object (a copy), the element its path
    names, and the request body."""

    tenant: SimulatedTenant
    policy: Contract
    writes: WriteContract
    write: Write
    stored: dict[str, Any]
    sub_id: str | None
    body: dict[str, Any]

    @property
    def source(self) -> str:
        assert self.write.source is not None
        return self.write.source

    @property
    def body_key(self) -> str:
        assert self.write.body_key is not None
        return self.write.body_key

    def current(self) -> list[dict[str, Any]]:
        return list(self.stored.get(self.source) or ())

    def elements(self, items: Any) -> list[dict[str, Any]]:
        return _elements(self.tenant, self.policy, self.source, items, self.stored["id"])

    def element(self, item: Any, index: int, *, new: bool = True) -> dict[str, Any]:
        return _element(
            self.tenant, self.policy, self.source, item, self.stored["id"], index, new=new
        )


Effect = Callable[[_Target], tuple[dict[str, Any], Any]]


def _patch(t: _Target) -> tuple[dict[str, Any], Any]:
    changes = _top_level(t.writes, t.body)
    _check_create_only(t.writes, t.stored, changes)
    return changes, _ENTITY


def _replace(t: _Target) -> tuple[dict[str, Any], Any]:
    # PUT: the body is the whole object; writable fields it leaves out are reset.
    changes, _ = _patch(t)
    for key in _top_level(t.writes, t.stored).keys() - {"@odata.type"}:
        changes.setdefault(key, None)
    changes[t.source] = t.elements(t.body.get(t.write.body_key or t.source) or [])
    return changes, _ENTITY


def _required(t: _Target) -> Any:
    if t.body_key not in t.body:
        raise _bad(f"The body needs '{t.body_key}'.")
    return t.body[t.body_key]


def _set(t: _Target) -> tuple[dict[str, Any], Any]:
    items = t.elements(_required(t))
    return {t.source: items}, {"value": items}


def _merge(t: _Target) -> tuple[dict[str, Any], Any]:
    current, match = t.current(), t.write.match_field
    for item in t.elements(_required(t)):
        at = next((n for n, c in enumerate(current) if c.get(match) == item.get(match)), None)
        if at is None:
            current.append(item)
        else:
            current[at] = {**current[at], **item, "id": current[at]["id"]}
    return {t.source: current}, _ENTITY


def _index(current: list[dict[str, Any]], element_id: Any, source: str) -> int:
    at = next((n for n, c in enumerate(current) if c.get("id") == element_id), None)
    if at is None:
        raise WriteRefused(404, "ResourceNotFound", f"No '{source}' element '{element_id}'.")
    return at


def _listed(t: _Target, key: str) -> list[Any]:
    items = t.body.get(key) or []
    if not isinstance(items, list):
        raise _bad(f"'{key}' must be a list.")
    return items


def _delta(t: _Target) -> tuple[dict[str, Any], Any]:
    added_key, updated_key, deleted_key = t.write.delta_keys
    current = t.current()
    for item in _listed(t, added_key):
        fresh = {k: v for k, v in item.items() if k != "id"} if isinstance(item, dict) else item
        current.append(t.element(fresh, len(current)))
    for item in _listed(t, updated_key):
        at = _index(current, item.get("id") if isinstance(item, dict) else None, t.source)
        current[at] = {**current[at], **t.element(item, at, new=False)}
    for element_id in _listed(t, deleted_key):
        current.pop(_index(current, element_id, t.source))
    return {t.source: current}, _ENTITY


def _append(t: _Target) -> tuple[dict[str, Any], Any]:
    current = t.current()
    item = t.element({k: v for k, v in t.body.items() if k != "id"}, len(current))
    if any(c.get("id") == item["id"] for c in current):
        raise WriteRefused(409, "Conflict", f"'{t.source}' already holds '{item['id']}'.")
    return {t.source: [*current, item]}, item


def _patch_element(t: _Target) -> tuple[dict[str, Any], Any]:
    current = t.current()
    at = _index(current, t.sub_id, t.source)
    current[at] = {**current[at], **_resolve_binds(t.body), "id": t.sub_id}
    return {t.source: current}, current[at]


def _remove_element(t: _Target) -> tuple[dict[str, Any], Any]:
    current = t.current()
    current.pop(_index(current, t.sub_id, t.source))
    return {t.source: current}, None


def _field(t: _Target) -> tuple[dict[str, Any], Any]:
    return {t.source: copy.deepcopy(_required(t))}, _ENTITY


_EFFECTS: dict[str, Effect] = {
    "patch": _patch,
    "replace": _replace,
    "set": _set,
    "merge": _merge,
    "delta": _delta,
    "append": _append,
    "patch_element": _patch_element,
    "remove_element": _remove_element,
    "field": _field,
}


def _apply_one(
    tenant: SimulatedTenant,
    contract: Contract,
    item_id: str | None,
    sub_id: str | None,
    body: Any,
) -> Written:
    write = contract.write
    assert write is not None and contract.parent is not None
    policy = CONTRACTS[contract.parent]
    assert policy.writes is not None
    if write.method != "DELETE" and not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    if write.effect == "create":
        return _create(tenant, policy, write, item_id, body)
    assert item_id is not None
    stored = tenant.stored_policy(policy.key, item_id)
    if stored is None:
        raise WriteRefused(404, "ResourceNotFound", f"Resource with id '{item_id}' was not found")
    if write not in allowed_writes(policy, stored):
        raise _bad(f"This is a built-in object: {policy.writes.builtin_why}.")
    target = _Target(
        tenant, policy, policy.writes, write, copy.deepcopy(stored), sub_id, body or {}
    )
    changes, result = _EFFECTS[write.effect](target)
    updated = tenant.update_policy(policy.key, item_id, changes)
    if write.status == 204:
        return Written(204)
    return Written(write.status, _entity(updated) if result is _ENTITY else result)


def apply_write(
    tenant: SimulatedTenant,
    contracts: Iterable[Contract],
    item_id: str | None,
    sub_id: str | None,
    body: Any,
) -> Written:
    """Apply the write(s) one request makes. Writes that share a method and path (a policy
    set's update action takes items and assignments) are told apart by the body's keys."""
    candidates = list(contracts)
    chosen = candidates
    if len(candidates) > 1:
        keys = set(body) if isinstance(body, dict) else set()
        chosen = [c for c in candidates if c.write and keys & set(c.write.body_keys)]
        if not chosen:
            raise _bad("The request body names nothing this action changes.")
    answer = Written(204)
    for contract in chosen:
        answer = _apply_one(tenant, contract, item_id, sub_id, body)
    return answer
