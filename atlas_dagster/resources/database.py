"""The application database as a Dagster resource.

The resource carries no URL and no secret — only where the atlas config lives. The URL (which may
hold a password) is read from the config at run time, so it never shows in the Dagster UI.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dagster as dg
from sqlalchemy.engine import Engine

from atlas_dagster import db
from atlas_dagster.config import AtlasConfig, config_path, load_config

_config_cache: dict[tuple[str, float], AtlasConfig] = {}
_ready: set[AtlasConfig] = set()
_lock = threading.Lock()


def cached_config(path: str | None = None) -> AtlasConfig:
    """The config, re-read only when the file changes (sensors build resources every tick)."""
    resolved = Path(path) if path else config_path()
    key = (str(resolved), resolved.stat().st_mtime if resolved and resolved.exists() else 0.0)
    with _lock:
        config = _config_cache.get(key)
    if config is None:
        config = load_config(resolved)
        with _lock:
            _config_cache[key] = config
    return config


def ready_engine(config: AtlasConfig) -> Engine:
    """An engine whose database is at the head revision and holds the config's entries."""
    engine = db.engine_for(config.database_url)
    with _lock:
        if config in _ready:
            return engine
    if db.current_revision(engine) != db.head_revision():
        db.upgrade(engine)
    db.sync_config(engine, config)
    with _lock:
        _ready.add(config)
    return engine


def forget_ready_engines() -> None:
    with _lock:
        _ready.clear()
        _config_cache.clear()


class DatabaseResource(dg.ConfigurableResource):
    """Where the atlas config lives; the database comes from it."""

    config_path: str | None = None

    def config(self) -> AtlasConfig:
        return cached_config(self.config_path or os.environ.get("ATLAS_CONFIG"))

    def engine(self) -> Engine:
        return ready_engine(self.config())
