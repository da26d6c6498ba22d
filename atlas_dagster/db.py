"""Engines, migrations and the config → database sync.

Engines are cached per process and URL: Dagster builds resources on every sensor tick, and a new
engine (pool, dialect setup) per tick would be wasteful.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from atlas_dagster import schema
from atlas_dagster.config import AtlasConfig

MIGRATIONS = Path(__file__).parent / "migrations"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create_engine(url)
            _engines[url] = engine
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_conn, _record):
            # Let SQLAlchemy own transactions, so BEGIN IMMEDIATE below takes the write lock up
            # front: two writers then queue on busy_timeout instead of deadlocking on upgrade.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=10, max_overflow=30)


def sqlalchemy_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2 (the driver dagster-postgres ships with); SQLAlchemy 2.1
    would otherwise pick psycopg 3."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as conn:
        yield conn


def alembic_config(engine: Engine | None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config(None))
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


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (idempotent), then recreate the views.

    Views are repeatable: they only read tables, so dropping and recreating them from
    ``schema.VIEWS`` after each upgrade keeps a single definition of each.
    """
    with _migration_lock(engine):  # every caller: the CLI, the daemon, run workers
        command.upgrade(alembic_config(engine), revision)
        with transaction(engine) as conn:
            for name in schema.VIEWS:
                conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
            for name, sql in schema.VIEWS.items():
                conn.exec_driver_sql(f"CREATE VIEW {name} AS {sql}")


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def sync_config(engine: Engine, config: AtlasConfig) -> dict[str, int]:
    """Upsert the config's connections and schedules (never secrets); returns key → id of the
    connections. Removed config entries keep their rows: their data stays queryable."""
    now = schema.utcnow()
    pc, bs = schema.provider_connections, schema.backup_schedules
    with transaction(engine) as conn:
        existing = {row.key: row for row in conn.execute(sa.select(pc))}
        ids: dict[str, int] = {}
        for c in config.provider_connections:
            values = {
                "display_name": c.display_name,
                "tenant_id": c.tenant_id,
                "client_id": c.client_id,
            }
            row = existing.get(c.key)
            if row is None:
                ids[c.key] = conn.execute(
                    pc.insert().values(key=c.key, created_at=now, updated_at=now, **values)
                ).inserted_primary_key[0]
            else:
                ids[c.key] = row.id
                if any(getattr(row, k) != v for k, v in values.items()):
                    conn.execute(
                        pc.update().where(pc.c.id == row.id).values(updated_at=now, **values)
                    )
        sched_rows = {row.key: row for row in conn.execute(sa.select(bs))}
        for s in config.backup_schedules:
            values = {
                "provider_connection_id": ids[s.provider_connection],
                "cron": s.cron,
                "timezone": s.timezone,
                "policy_types": list(s.policy_types),
                "retention_days": s.retention_days,
                "enabled": s.enabled,
            }
            row = sched_rows.get(s.key)
            if row is None:
                conn.execute(
                    bs.insert().values(key=s.key, created_at=now, updated_at=now, **values)
                )
            elif any(getattr(row, k) != v for k, v in values.items()):
                conn.execute(bs.update().where(bs.c.id == row.id).values(updated_at=now, **values))
        # Schedules removed from the config stop running: keep their history, disable them.
        removed = [k for k in sched_rows if k not in {s.key for s in config.backup_schedules}]
        if removed:
            conn.execute(
                bs.update()
                .where(bs.c.key.in_(removed), bs.c.enabled)
                .values(enabled=False, updated_at=now)
            )
        _set_setting(conn, "dagster_webserver_url", config.dagster_webserver_url)
    return ids


def _set_setting(conn: Connection, key: str, value: str) -> None:
    t = schema.atlas_settings
    current = conn.execute(sa.select(t.c.value).where(t.c.key == key)).scalar()
    if current is None:
        conn.execute(t.insert().values(key=key, value=value))
    elif current != value:
        conn.execute(t.update().where(t.c.key == key).values(value=value))


def connection_ids(engine: Engine) -> dict[str, int]:
    pc = schema.provider_connections
    with engine.connect() as conn:
        return {row.key: row.id for row in conn.execute(sa.select(pc.c.key, pc.c.id))}
