"""The application database as a Dagster resource.

The resource carries no URL and no secret — only where the atlas config lives. The URL (which may
hold a password) is read from the config at run time, so it never shows in the Dagster UI.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from atlas_dagster import db
from atlas_dagster.config import AtlasConfig, config_path, load_config

_config_cache: dict[tuple[str, float], AtlasConfig] = {}
_ready: set[tuple[str, str]] = set()
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


def head_revision() -> str:
    script = ScriptDirectory.from_config(db.alembic_config(None))
    head = script.get_current_head()
    assert head is not None
    return head


@contextmanager
def _migration_lock(engine: Engine):
    """Serialise schema upgrades across processes (CLI, daemon, run workers)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(742001)")
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(742001)")
                conn.commit()
        return
    path = engine.url.database or ""
    lock_path = path + ".migrate.lock" if path and path != ":memory:" else None
    if lock_path is None:
        yield
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ready_engine(config: AtlasConfig) -> Engine:
    """An engine whose database is at the head revision and holds the config's entries."""
    engine = db.engine_for(config.database_url)
    marker = (config.database_url, repr(config))
    with _lock:
        if marker in _ready:
            return engine
    if db.current_revision(engine) != head_revision():
        with _migration_lock(engine):
            if db.current_revision(engine) != head_revision():
                db.upgrade(engine)
    db.sync_config(engine, config)
    with _lock:
        _ready.add(marker)
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
