"""The shape of a YAML document before it is constructed: the line of every value, the names
messages give list entries, and the keys given twice — which YAML loaders resolve silently, by
keeping the last. Config errors name lines through it."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from pydantic_core import ErrorDetails

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_Path = tuple[str | int, ...]


@dataclass
class Layout:
    """A YAML document's shape before construction: the line of each node by its path (mapping
    keys and list indices, as validation errors locate values), the names messages give list
    entries, and the first key given twice in one mapping, which YAML loaders resolve by
    silently keeping the last."""

    empty: int | None = None  # the line of a document that holds no settings
    lines: dict[_Path, int] = field(default_factory=dict)
    labels: dict[_Path, str] = field(default_factory=dict)
    duplicate: tuple[_Path, int, int] | None = None

    @classmethod
    def of(cls, node: yaml.Node | None) -> Layout:
        if node is None or node.tag == _NULL_TAG:
            # An empty file is a mistake, not the demo.
            return cls(empty=node.start_mark.line + 1 if node is not None else 1)
        layout = cls(lines={(): node.start_mark.line + 1})
        layout._visit(node, (), set())
        return layout

    def _visit(self, node: yaml.Node, path: _Path, visited: set[int]) -> None:
        if id(node) in visited:  # an alias of a node already seen
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                label = _entry_label(item)
                if label is not None:
                    self.labels[(*path, index)] = label
                self._visit(item, (*path, index), visited)
        elif isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue  # merged keys may be overridden; that is what a merge is for
                line = key.start_mark.line + 1
                self.lines[(*path, key.value)] = line
                first = first_lines.get((key.tag, key.value))
                if first is None:
                    first_lines[key.tag, key.value] = line
                elif self.duplicate is None:
                    self.duplicate = ((*path, key.value), line, first)
                self._visit(value, (*path, key.value), visited)

    def structure_problem(self) -> str | None:
        if self.empty is not None:
            return (
                f"line {self.empty}: the file holds no settings "
                "(expected a mapping such as 'provider_connections: [...]')"
            )
        if self.duplicate is None:
            return None
        path, line, first = self.duplicate
        return f"{self.where(path)}: duplicate key at line {line} (first given at line {first})"

    def where(self, path: _Path) -> str:
        """A path as messages name it: ``provider_connections[contoso].client_secret``."""
        parts: list[str] = []
        for depth, part in enumerate(path):
            if isinstance(part, int):
                parts.append(f"[{self.labels.get(path[: depth + 1], part)}]")
            else:
                parts.append(f".{part}" if parts else part)
        return "".join(parts) or "top level"

    def explain(self, error: ErrorDetails) -> str:
        """One validation error as ``line N: entry.field: problem``."""
        path: _Path = (*error["loc"], *error.get("ctx", {}).get("at", ()))
        if error["type"] == "missing":
            problem = "is required"
        elif error["type"] == "string_type":
            problem = f"expected a string, got {type(error['input']).__name__}"
        else:
            problem = error["msg"]
        # The deepest node the file has: a missing field is named at its entry.
        line = next(
            self.lines[path[:n]] for n in reversed(range(len(path) + 1)) if path[:n] in self.lines
        )
        return f"line {line}: {self.where(path)}: {problem}"


def _entry_label(item: yaml.Node) -> str | None:
    """A list entry's name in messages: its ``key`` when it has one (else its index)."""
    for key, value in item.value if isinstance(item, yaml.MappingNode) else ():
        if isinstance(key, yaml.ScalarNode) and key.value == "key" and _is_text(value):
            return value.value
    return None


def _is_text(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG and node.value != ""
