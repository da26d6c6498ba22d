"""A backup set as files: one JSON file per policy and a manifest, ready to commit to git."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from atlas_dagster.stores.backups import load_payloads, require_set, set_items

MANIFEST = "manifest.json"


def export_text(payload: str) -> str:
    """A stored payload as a file: sorted keys, indent 2, trailing newline (byte-stable)."""
    return json.dumps(json.loads(payload), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def file_stem(display_name: str | None, external_id: str) -> str:
    """``<sanitised display name>__<id>``: readable, unique per policy, safe on every OS."""
    return f"{_sanitise(display_name or '', 80) or 'unnamed'}__{_sanitise(external_id, 120)}"


def _sanitise(text: str, limit: int) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text).strip("-._")
    return cleaned[:limit].rstrip("-._")


@dataclass
class ExportResult:
    directory: str
    files: list[str]
    removed: list[str]


def export_set(engine: Engine, set_id: int, directory: str | Path) -> ExportResult:
    """Write one JSON file per policy (``<contract_key>/<name>__<id>.json``, the stored payload
    byte-stable) and ``manifest.json`` (the set, and each file's assignment names). Files of an
    earlier export into the same directory that this set no longer holds are removed, so the
    directory can be committed to git as is."""
    backup = require_set(engine, set_id)
    root = Path(directory)
    items = set_items(engine, set_id)
    payloads = load_payloads(
        engine,
        [i.content_hash for i in items.values()]
        + [i.assignment_names_hash for i in items.values() if i.assignment_names_hash],
    )
    earlier = _manifest_files(root)
    files: list[dict[str, Any]] = []
    used: set[str] = set()
    for key in sorted(items):
        item = items[key]
        stem = file_stem(item.display_name, item.external_id)
        if f"{item.contract_key}/{stem}".lower() in used:
            # Two ids that sanitise alike (or differ only in case): keep both files apart.
            stem += "-" + hashlib.sha256(item.external_id.encode()).hexdigest()[:8]
        used.add(f"{item.contract_key}/{stem}".lower())
        rel = f"{item.contract_key}/{stem}.json"
        _write_if_changed(root / rel, export_text(payloads[item.content_hash]))
        names = payloads.get(item.assignment_names_hash or "")
        files.append(
            {
                "file": rel,
                "contract_key": item.contract_key,
                "external_id": item.external_id,
                "display_name": item.display_name,
                "policy_type": item.policy_type,
                "content_hash": item.content_hash,
                "assignments": json.loads(names)["assignments"] if names else [],
            }
        )
    written = {f["file"] for f in files}
    removed = sorted(earlier - written)
    for rel in removed:
        target = root / rel
        if target.is_file():
            target.unlink()
        if target.parent != root and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()
    manifest = {
        "backup_set": {
            k: v
            for k, v in backup.to_dict().items()
            if k
            in (
                "id",
                "provider_connection",
                "backup_schedule",
                "operation_run_id",
                "scheduled_for",
                "created_at",
                "completed_at",
                "status",
                "policy_types",
                "failure_summary",
            )
        },
        "files": files,
    }
    _write_if_changed(root / MANIFEST, json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return ExportResult(str(root), sorted(written), removed)


def _manifest_files(root: Path) -> set[str]:
    path = root / MANIFEST
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(f["file"]) for f in data.get("files", []) if ".." not in str(f["file"])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return set()


def _write_if_changed(path: Path, text: str) -> None:
    # Leaving unchanged files untouched keeps their mtimes, so git and rsync see no change.
    data = text.encode()
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
