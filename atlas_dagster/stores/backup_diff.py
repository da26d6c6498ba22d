"""Comparing backup sets: which policies two sets hold differently, and field by field how.

Payloads are compared as ``stable_payload`` sees them, so volatile fields never show as a change,
and an unordered array is matched element by element by an identity field, so a reordering is no
change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from atlas_dagster.stores.backups import (
    SET_COMPLETE,
    SET_PARTIAL,
    BackupSet,
    BackupStoreError,
    StoredItem,
    load_payloads,
    require_set,
    set_items,
)
from graph_contracts import CONTRACTS, UNORDERED_ARRAYS, canonical_json, stable_payload

# How elements of an unordered array are matched between two versions: the first of these
# fields that every element carries and that is unique within each version.
IDENTITY_FIELDS = (
    "settingInstance.settingDefinitionId",
    "definitionId",
    "definition.id",
    "presentation.id",
    "ruleName",
    "actionType",
    "locale",
    "mobileAppIdentifier.bundleId",
    "mobileAppIdentifier.packageId",
    "id",
    "target.groupId",
)


@dataclass(frozen=True)
class FieldChange:
    path: str
    kind: str  # added, removed, changed
    before: Any = None
    after: Any = None


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _identity_field(before: list[Any], after: list[Any]) -> str | None:
    elements = before + after
    if not elements or not all(isinstance(e, dict) for e in elements):
        return None
    for name in IDENTITY_FIELDS:
        values_ok = True
        for side in (before, after):
            values = [_lookup(e, name) for e in side]
            if any(v is None or isinstance(v, dict | list) for v in values) or len(
                set(map(str, values))
            ) != len(values):
                values_ok = False
                break
        if values_ok:
            return name
    return None


def field_diff(before: Any, after: Any, path: str = "") -> list[FieldChange]:
    """Field-level differences between two stable payloads (see ``stable_payload``). Unordered
    arrays are matched by element identity, so a reordering is no change."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[FieldChange] = []
        for key in sorted(set(before) | set(after)):
            sub = f"{path}.{key}" if path else key
            if key not in before:
                out.append(FieldChange(sub, "added", after=after[key]))
            elif key not in after:
                out.append(FieldChange(sub, "removed", before=before[key]))
            elif isinstance(before[key], list) and isinstance(after[key], list):
                out += _list_diff(key, before[key], after[key], sub)
            else:
                out += field_diff(before[key], after[key], sub)
        return out
    if before == after and type(before) is type(after):
        return []
    return [FieldChange(path, "changed", before, after)]


def _list_diff(key: str, before: list[Any], after: list[Any], path: str) -> list[FieldChange]:
    if key not in UNORDERED_ARRAYS:
        out: list[FieldChange] = []
        for n in range(max(len(before), len(after))):
            sub = f"{path}[{n}]"
            if n >= len(before):
                out.append(FieldChange(sub, "added", after=after[n]))
            elif n >= len(after):
                out.append(FieldChange(sub, "removed", before=before[n]))
            else:
                out += field_diff(before[n], after[n], sub)
        return out
    identity = _identity_field(before, after)
    if identity is None:
        # Elements without an identity: compare as multisets of whole values.
        left = [canonical_json(v) for v in before]
        right = [canonical_json(v) for v in after]
        out = []
        for text in sorted(set(left) | set(right)):
            extra = right.count(text) - left.count(text)
            value = json.loads(text)
            for _ in range(abs(extra)):
                out.append(
                    FieldChange(f"{path}[]", "added", after=value)
                    if extra > 0
                    else FieldChange(f"{path}[]", "removed", before=value)
                )
        return out
    old = {str(_lookup(e, identity)): e for e in before}
    new = {str(_lookup(e, identity)): e for e in after}
    out = []
    for ident in sorted(set(old) | set(new)):
        sub = f"{path}[{identity}={ident}]"
        if ident not in old:
            out.append(FieldChange(sub, "added", after=new[ident]))
        elif ident not in new:
            out.append(FieldChange(sub, "removed", before=old[ident]))
        else:
            out += field_diff(old[ident], new[ident], sub)
    return out


@dataclass(frozen=True)
class PolicyRef:
    contract_key: str
    external_id: str
    display_name: str | None
    policy_type: str | None


@dataclass(frozen=True)
class PolicyChange:
    policy: PolicyRef
    fields: list[FieldChange]


@dataclass
class SetDiff:
    set_a: int
    set_b: int
    compared_types: list[str]
    skipped_types: list[str]
    added: list[PolicyRef] = field(default_factory=list)
    removed: list[PolicyRef] = field(default_factory=list)
    changed: list[PolicyChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ref(item: StoredItem) -> PolicyRef:
    return PolicyRef(item.contract_key, item.external_id, item.display_name, item.policy_type)


def diff_sets(engine: Engine, a: int, b: int) -> SetDiff:
    """What changed from set ``a`` to set ``b``: policies added, removed and changed (with their
    field changes), over the policy types both sets hold completely."""
    first, second = require_set(engine, a), require_set(engine, b)
    for s in (first, second):
        if s.status not in (SET_COMPLETE, SET_PARTIAL):
            raise BackupStoreError(f"backup set #{s.id} is {s.status}: it holds no usable copy")
    compared = sorted(first.covered_types & second.covered_types)
    skipped = sorted((first.covered_types | second.covered_types) - set(compared))
    old, new = set_items(engine, a, compared), set_items(engine, b, compared)
    result = SetDiff(a, b, compared, skipped)
    result.added = [_ref(new[k]) for k in sorted(new.keys() - old.keys())]
    result.removed = [_ref(old[k]) for k in sorted(old.keys() - new.keys())]
    changed = [
        k for k in sorted(old.keys() & new.keys()) if old[k].content_hash != new[k].content_hash
    ]
    payloads = load_payloads(
        engine, [old[k].content_hash for k in changed] + [new[k].content_hash for k in changed]
    )
    for k in changed:
        contract = CONTRACTS[k[0]]
        before = stable_payload(contract, json.loads(payloads[old[k].content_hash]))
        after = stable_payload(contract, json.loads(payloads[new[k].content_hash]))
        result.changed.append(PolicyChange(_ref(new[k]), field_diff(before, after)))
    return result


def change_counts(engine: Engine, previous: BackupSet | None, current: BackupSet) -> dict[str, int]:
    """Policies added, removed and changed since ``previous`` (by content hash), over the types
    both sets hold completely."""
    if previous is None:
        return {"added": current.item_count, "removed": 0, "changed": 0}
    types = previous.covered_types & current.covered_types
    old, new = set_items(engine, previous.id, types), set_items(engine, current.id, types)
    return {
        "added": len(new.keys() - old.keys()),
        "removed": len(old.keys() - new.keys()),
        "changed": sum(
            1 for k in old.keys() & new.keys() if old[k].content_hash != new[k].content_hash
        ),
    }
