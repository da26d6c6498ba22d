"""Engines, migrations and the config → database sync.

Engines are cached per process and URL: Dagster builds resources on every sensor tick, and a new
engine (pool, dialect setup) per tick would be wasteful. Writers use ``ready_engine`` (migrated,
config synced); commands that only read use ``read_engine``, which changes nothing, so they work
for a read-only role and start fast. Nothing here imports Dagster, and Alembic only to migrate.
"""

from __future__ import annotations

import fcntl
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from atlas_dagster import schema
from atlas_dagster.config import AtlasConfig, config_path, load_config

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration; a test keeps it equal to Alembic's head. Reads compare the database's
# revision with it without loading Alembic.
HEAD_REVISION = "0004"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
_config_cache: dict[tuple[str, float], AtlasConfig] = {}
_ready: set[AtlasConfig] = set()


class DatabaseNotReady(Exception):
    """The database is not at the schema this version reads (one line, for a command)."""


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
    engine = engine_for(config.database_url)
    with _lock:
        if config in _ready:
            return engine
    if current_revision(engine) != HEAD_REVISION:
        upgrade(engine)
    sync_config(engine, config)
    with _lock:
        _ready.add(config)
    return engine


def read_engine(config: AtlasConfig) -> Engine:
    """An engine for reading: the database must already be at the head revision; nothing is
    migrated or written."""
    engine = engine_for(config.database_url)
    revision = current_revision(engine)
    if revision != HEAD_REVISION:
        where = f"at revision {revision}" if revision else "not set up"
        raise DatabaseNotReady(
            f"the database of {config.source} is {where}; this version reads revision "
            f"{HEAD_REVISION}: run 'atlas-dagster db upgrade' (or any start) first"
        )
    return engine


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
        _sqlite_transactions(engine)
        return engine
    return sa.create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=10, max_overflow=30)


# The execution option of a connection that only reads (see read_connection).
_READS = "atlas_reads"
# Set on conn.info by a SELECT about to begin a transaction implicitly. conn.info outlives a
# checkout, so the marker holds the Connection it was set for: one left behind by a statement
# that failed before it began is never taken for another connection's.
_READ_BEGIN = "atlas_read_begin"


def read_connection(engine: Engine) -> Connection:
    """A connection that only reads, for reads that start with something other than a SELECT
    (schema inspection, raw SQL): on SQLite its transactions, like every read's, never wait for
    a writer. A plain ``engine.connect()`` whose first statement is a SELECT needs nothing."""
    return engine.connect().execution_options(**{_READS: True})


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite transactions in which a read never waits for a writer.

    In WAL mode a reader never waits for a writer, so a read begins a plain (deferred)
    transaction. A writer takes the write lock up front (BEGIN IMMEDIATE): writers then queue on
    busy_timeout, where a deferred transaction that read first would fail with SQLITE_BUSY when
    it came to write. Which is which shows in how a transaction begins. Writers open theirs
    explicitly (``engine.begin()``, ``conn.begin()``). A read on ``engine.connect()`` has it
    begun implicitly by its first statement, a SELECT, or comes from :func:`read_connection`.
    Any other implicit begin (a write on a plain connection, or raw SQL, whose kind cannot be
    seen: ``exec_driver_sql`` fires no ``before_execute``) is taken as a writer's.
    """

    @sa.event.listens_for(engine, "connect")
    def _sqlite_setup(dbapi_conn, _record):
        # Let SQLAlchemy own transactions, so the begin hook below decides how each starts.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # Persistent in the file: the first connection converts a database still in
        # rollback-journal mode, where a reader and a writer block each other.
        cur.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL syncs at checkpoints rather than at every commit: a commit still
        # survives the process crashing and the file never corrupts; only an OS crash or power
        # loss can lose the latest commits (PostgreSQL is the production store).
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sa.event.listens_for(engine, "before_execute")
    def _note_implicit_read(conn, clauseelement, *_args):
        if not conn.in_transaction() and getattr(clauseelement, "is_select", False):
            conn.info[_READ_BEGIN] = conn

    @sa.event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        implicit_read = conn.info.pop(_READ_BEGIN, None) is conn
        read = implicit_read or conn.get_execution_options().get(_READS, False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def sqlalchemy_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2 (the driver dagster-postgres ships with); SQLAlchemy 2.1
    would otherwise pick psycopg 3."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def alembic_config(engine: Engine | None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

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
    from alembic import command

    with _migration_lock(engine):  # every caller: the CLI, the daemon, run workers
        command.upgrade(alembic_config(engine), revision)
        with engine.begin() as conn:
            for name in schema.VIEWS:
                conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
            for name, sql in schema.VIEWS.items():
                conn.exec_driver_sql(f"CREATE VIEW {name} AS {sql}")


def current_revision(engine: Engine) -> str | None:
    """The database's migration revision; None before the first migration. Every command asks,
    so it is one SELECT (Alembic's own check imports it and inspects the schema first)."""
    try:
        with read_connection(engine) as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.DBAPIError:
        return None


def sync_config(engine: Engine, config: AtlasConfig) -> dict[str, int]:
    """Upsert the config's connections and schedules (never secrets); returns key → id of the
    connections. Removed config entries keep their rows: their data stays queryable.

    Every command syncs, and almost always finds the database in step: that check only reads,
    so a command that merely reads (``runs``) never waits for a writer. Only a config that
    differs takes the write lock, and its changes are worked out again under it.
    """
    with engine.connect() as conn:
        in_step = not _config_changes(conn, config, schema.utcnow())
    if not in_step:
        with engine.begin() as conn:
            for change in _config_changes(conn, config, schema.utcnow()):
                conn.execute(change)
    keys = {c.key for c in config.provider_connections}
    return {key: id_ for key, id_ in connection_ids(engine).items() if key in keys}


def _config_changes(conn: Connection, config: AtlasConfig, now: datetime) -> list[sa.Executable]:
    """The statements that bring the database in step with the config; none when it is."""
    pc, bs, settings = schema.provider_connections, schema.backup_schedules, schema.atlas_settings
    changes: list[sa.Executable] = []
    connections = {row.key: row for row in conn.execute(sa.select(pc))}
    for c in config.provider_connections:
        values: dict[str, Any] = {
            "display_name": c.display_name,
            "tenant_id": c.tenant_id,
            "client_id": c.client_id,
        }
        row = connections.get(c.key)
        if row is None:
            changes.append(pc.insert().values(key=c.key, created_at=now, updated_at=now, **values))
        elif _differs(row, values):
            changes.append(pc.update().where(pc.c.id == row.id).values(updated_at=now, **values))

    schedules = {row.key: row for row in conn.execute(sa.select(bs))}
    for s in config.backup_schedules:
        owner = connections.get(s.provider_connection)
        # A connection inserted by these same changes has no id yet; its key finds it.
        owner_id = (
            owner.id
            if owner is not None
            else sa.select(pc.c.id).where(pc.c.key == s.provider_connection).scalar_subquery()
        )
        values = {
            "provider_connection_id": owner_id,
            "cron": s.cron,
            "timezone": s.timezone,
            "policy_types": list(s.policy_types),
            "retention_days": s.retention_days,
            "enabled": s.enabled,
        }
        row = schedules.get(s.key)
        if row is None:
            changes.append(bs.insert().values(key=s.key, created_at=now, updated_at=now, **values))
        elif owner is None or _differs(row, values):
            changes.append(bs.update().where(bs.c.id == row.id).values(updated_at=now, **values))
    # Schedules removed from the config stop running: keep their history, disable them.
    configured = {s.key for s in config.backup_schedules}
    removed = [key for key, row in schedules.items() if key not in configured and row.enabled]
    if removed:
        changes.append(
            bs.update().where(bs.c.key.in_(removed)).values(enabled=False, updated_at=now)
        )

    key, value = "dagster_webserver_url", config.dagster_webserver_url
    current = conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar()
    if current is None:
        changes.append(settings.insert().values(key=key, value=value))
    elif current != value:
        changes.append(settings.update().where(settings.c.key == key).values(value=value))
    return changes


def _differs(row: sa.Row, values: dict[str, Any]) -> bool:
    return any(getattr(row, k) != v for k, v in values.items())


def connection_ids(engine: Engine) -> dict[str, int]:
    pc = schema.provider_connections
    with engine.connect() as conn:
        return {row.key: row.id for row in conn.execute(sa.select(pc.c.key, pc.c.id))}
