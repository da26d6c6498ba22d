"""Shared fixtures: a private database per test (SQLite file or a fresh PostgreSQL database)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from atlas_dagster import db
from atlas_dagster.config import load_config, parse_config
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.simulator import (
    GraphSimulator,
    SimulatedTenant,
    install_simulator,
    uninstall_simulator,
)

PG_ADMIN_URL = os.environ.get(
    "ATLAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_pg_state: dict[str, bool] = {}


def postgres_available() -> bool:
    if "ok" not in _pg_state:
        try:
            engine = sa.create_engine(
                db.sqlalchemy_url(PG_ADMIN_URL), connect_args={"connect_timeout": 3}
            )
            with engine.connect():
                pass
            engine.dispose()
            _pg_state["ok"] = True
        except Exception:
            _pg_state["ok"] = False
    return _pg_state["ok"]


def require_postgres() -> None:
    if postgres_available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"PostgreSQL is required under CI but not reachable at {PG_ADMIN_URL}")
    pytest.skip(f"needs PostgreSQL at {PG_ADMIN_URL} (not reachable)")


def _admin_engine() -> sa.Engine:
    return sa.create_engine(db.sqlalchemy_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")


def create_pg_database() -> str:
    require_postgres()
    name = f"atlas_t_{uuid.uuid4().hex[:16]}"
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request) -> str:
    """A private, empty database on each backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    yield url
    _dispose(url)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        _dispose(url)
        drop_pg_database(url)


def _dispose(url: str) -> None:
    engine = db._engines.pop(url, None)
    if engine is not None:
        engine.dispose()
    # A later test may reuse the URL and an equal config: its database must be readied again.
    with db._lock:
        db._ready.clear()
        db._config_cache.clear()


def write_config(path: Path, database_url: str, extra: str = "") -> Path:
    """An atlas.yaml with one simulated connection and one backup schedule."""
    path.write_text(
        f"""\
database_url: {database_url}
provider_connections:
  - key: contoso
    display_name: Contoso Ltd
    simulated: {{profile: small, seed: 3}}
backup_schedules:
  - key: contoso-nightly
    provider_connection: contoso
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    policy_types: all
    retention_days: 30
    enabled: true
{extra}"""
    )
    return path


@pytest.fixture
def contoso_sim() -> Iterator[GraphSimulator]:
    """The simulated tenant behind write_config's "contoso" connection, removed afterwards so a
    test's changes to it (faults, permissions) never reach another test."""
    sim = GraphSimulator(SimulatedTenant.generate("small", 3))
    install_simulator("contoso", sim)
    yield sim
    uninstall_simulator("contoso")


@pytest.fixture
def contoso_env(tmp_path, database_url, monkeypatch, contoso_sim) -> Iterator[dict[str, Any]]:
    """The simulated contoso tenant with its config (also as ATLAS_CONFIG), its ready database,
    the definitions, and a Dagster instance that has its partition."""
    # Dagster and the definitions load only for the tests that run jobs.
    import dagster as dg

    from atlas_dagster.connections import ensure_partitions
    from atlas_dagster.definitions import build_definitions

    cfg = write_config(tmp_path / "atlas.yaml", database_url)
    monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
    config = load_config(cfg)
    engine = db.ready_engine(config)
    with dg.instance_for_test() as instance:
        ensure_partitions(instance, ["contoso"])
        yield {
            "cfg": cfg,
            "config": config,
            "defs": build_definitions(config),
            "instance": instance,
            "engine": engine,
            "sim": contoso_sim,
            "tenant": contoso_sim.tenant,
        }


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path: Path) -> None:
    """Tests never read the developer's atlas.yaml or Dagster home."""
    monkeypatch.delenv("ATLAS_CONFIG", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.chdir(tmp_path)


LEDGER_CONFIG = """\
provider_connections:
  - key: contoso
    simulated: {profile: small, seed: 1}
  - key: fabrikam
    simulated: {profile: small, seed: 2}
backup_schedules:
  - key: contoso-nightly
    provider_connection: contoso
    cron: "0 2 * * *"
"""


@pytest.fixture
def ledger(database_url) -> OperationLedger:
    """The ledger over a migrated private database with two simulated connections."""
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    db.sync_config(engine, parse_config(LEDGER_CONFIG, "atlas.yaml", {}))
    return OperationLedger(engine)


@pytest.fixture
def pg_pair() -> Iterator[tuple[str, str]]:
    """Two fresh PostgreSQL databases: the app's and Dagster's (both use an alembic_version
    table, so they cannot share one)."""
    app_url = create_pg_database()
    dagster_url = create_pg_database()
    try:
        yield app_url, dagster_url
    finally:
        drop_pg_database(app_url)
        drop_pg_database(dagster_url)
