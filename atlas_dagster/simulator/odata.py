"""OData query options as Graph applies them: ``$select``, nested ``$expand`` and the shaping of
stored objects into response objects. Pure functions over dicts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Navigation properties: stored with their objects, returned only when expanded.
NAVIGATION = frozenset(
    {
        "assignments",
        "settings",
        "settingDefinitions",
        "definitionValues",
        "definition",
        "presentationValues",
        "presentation",
        "scheduledActionsForRule",
        "scheduledActionConfigurations",
        "apps",
        "items",
        "localizedNotificationMessages",
        "roleAssignments",
    }
)
# Properties Graph leaves out of collection responses (only a GET of the item returns them).
ITEM_ONLY = frozenset({"scriptContent", "detectionScriptContent", "remediationScriptContent"})
ALWAYS = ("@odata.type", "id")


class QueryError(ValueError):
    """A query option Graph would refuse with 400 BadRequest."""


@dataclass(frozen=True)
class Shape:
    """What to return of an object: selected properties (None = all) and expansions."""

    select: frozenset[str] | None = None
    expand: dict[str, Shape] = field(default_factory=dict)

    @cached_property
    def listed(self) -> frozenset[str] | None:
        """With a $select and no $expand, exactly the properties a collection response keeps
        (the common case, shaped in one pass); None otherwise."""
        if self.select is None or self.expand:
            return None
        return (self.select | frozenset(ALWAYS)) - NAVIGATION - ITEM_ONLY


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise QueryError(f"unbalanced parentheses in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise QueryError(f"unbalanced parentheses in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_select(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise QueryError("$select is empty")
    return names


def parse_expand(text: str | None) -> dict[str, Shape]:
    """``a,b($select=x,y;$expand=c)`` as ``{"a": Shape(), "b": Shape({"x","y"}, {"c": ...})}``."""
    if not text:
        return {}
    out: dict[str, Shape] = {}
    for item in split_top_level(text, ","):
        name, _, rest = item.partition("(")
        name = name.strip()
        select: frozenset[str] | None = None
        expand: dict[str, Shape] = {}
        if rest:
            if not rest.endswith(")"):
                raise QueryError(f"malformed $expand item {item!r}")
            for option in split_top_level(rest[:-1], ";"):
                key, _, value = option.partition("=")
                if key.strip().lower() == "$select":
                    select = parse_select(value)
                elif key.strip().lower() == "$expand":
                    expand = parse_expand(value)
                else:
                    raise QueryError(f"unsupported nested option {key!r} in $expand")
        out[name] = Shape(select, expand)
    return out


def shape(obj: dict[str, Any], how: Shape, *, item_read: bool = False) -> dict[str, Any]:
    """The response form of a stored object."""
    keep = None if item_read else how.listed
    if keep is not None:
        return {key: value for key, value in obj.items() if key in keep}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in NAVIGATION:
            if key in how.expand:
                out[key] = _shape_navigation(value, how.expand[key])
            continue
        if key in ITEM_ONLY and not item_read:
            continue
        if how.select is not None and key not in how.select and key not in ALWAYS:
            continue
        out[key] = value
    return out


def _shape_navigation(value: Any, how: Shape) -> Any:
    if isinstance(value, list):
        return [shape(v, how) for v in value]
    if isinstance(value, dict):
        return shape(value, how)
    return value


_EQ = re.compile(r"^\s*(\w+)\s+eq\s+'((?:[^']|'')*)'\s*$")


def parse_filter(text: str | None) -> tuple[str, str] | None:
    """``$filter=field eq 'value'`` as (field, value); the one form a restore sends. Anything
    else is refused as Graph refuses a clause it cannot apply."""
    if text is None:
        return None
    match = _EQ.match(text)
    if match is None:
        raise QueryError(f"Invalid filter clause: {text}")
    return match.group(1), match.group(2).replace("''", "'")


def contract_shape(select: tuple[str, ...], expand: tuple[str, ...]) -> Shape:
    """The shape a contract's own query asks for."""
    return Shape(
        parse_select(",".join(select)) if select else None,
        parse_expand(",".join(expand)) if expand else {},
    )
