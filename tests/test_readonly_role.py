"""`db grant-readonly`: a PostgreSQL role that reads every table and view and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from atlas_dagster import db, schema
from atlas_dagster.config import parse_config
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.stores.checks import record_checks
from tests.conftest import PG_ADMIN_URL, write_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def role(postgres_url):
    name = f"atlas_ro_{uuid.uuid4().hex[:10]}"
    yield name
    admin = sa.create_engine(db.sqlalchemy_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP OWNED BY "{name}"')
    admin.dispose()
    server = sa.create_engine(db.sqlalchemy_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        database = postgres_url.rsplit("/", 1)[1]
        conn.exec_driver_sql(f'REVOKE ALL ON DATABASE "{database}" FROM "{name}"')
    server.dispose()
    # The database is dropped by the fixture; the role after it (see finaliser order).
    _drop_role_later.append(name)


_drop_role_later: list[str] = []


@pytest.fixture(autouse=True)
def _drop_roles():
    yield
    if not _drop_role_later:
        return
    server = sa.create_engine(db.sqlalchemy_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        while _drop_role_later:
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{_drop_role_later.pop()}"')
    server.dispose()


def test_readonly_role_reads_everything_and_writes_nothing(tmp_path, postgres_url, role):
    cfg = write_config(tmp_path / "atlas.yaml", postgres_url)
    env = {**os.environ, "ATLAS_CONFIG": str(cfg)}
    for args in (["db", "upgrade"], ["db", "grant-readonly", role]):
        done = subprocess.run(
            [sys.executable, "-m", "atlas_dagster.cli", *args],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    engine = db.engine_for(postgres_url)
    db.sync_config(engine, parse_config(cfg.read_text(), "atlas.yaml", {}))
    conn_id = db.connection_ids(engine)["contoso"]
    row = (
        OperationLedger(engine)
        .start(
            "provider_connection.verify",
            provider_connection_id=conn_id,
            trigger_source="cli",
            initiator="x",
        )
        .row
    )
    record_checks(
        engine,
        conn_id,
        [
            {
                "contract_key": "app_protection_ios",
                "status": "missing_permission",
                "missing_permissions": ["DeviceManagementApps.Read.All"],
            }
        ],
        row.id,
    )

    ro_url = postgres_url.replace("postgres@", f"{role}@", 1)
    ro = sa.create_engine(db.sqlalchemy_url(ro_url))
    with ro.connect() as conn:
        for name in (*schema.CACHED_TABLES, *schema.VIEWS):
            conn.exec_driver_sql(f"SELECT * FROM {name}").fetchall()
        assert conn.exec_driver_sql("SELECT count(*) FROM operation_runs").scalar() == 1
        missing = conn.exec_driver_sql(
            "SELECT missing_permissions FROM provider_connection_checks"
        ).scalar()
        assert missing == ["DeviceManagementApps.Read.All"]
    for name in schema.CACHED_TABLES:
        for statement in (
            f"DELETE FROM {name}",
            f"UPDATE {name} SET {_first_column(name)} = {_first_column(name)}",
        ):
            with (
                ro.connect() as conn,
                pytest.raises(sa.exc.ProgrammingError, match="permission denied"),
            ):
                conn.exec_driver_sql(statement)
    with ro.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        conn.exec_driver_sql("CREATE TABLE sneaky (id int)")
    ro.dispose()

    # Starting an operation as the read-only role is refused in one line naming the role, and
    # leaves no row behind.
    ro_cfg = write_config(tmp_path / "ro.yaml", ro_url)
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlas_dagster.cli",
            "start",
            "inventory.sync",
            "--connection",
            "contoso",
        ],
        env={**os.environ, "ATLAS_CONFIG": str(ro_cfg)},
        capture_output=True,
        text=True,
    )
    assert started.returncode == 2, started.stderr
    assert started.stderr.splitlines() == [
        f"error: connected as database role {role!r}, which cannot write operation runs; "
        f"starting inventory.sync needs a role with write access (database_url in {ro_cfg})"
    ]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM operation_runs").scalar() == 1


def _first_column(name: str) -> str:
    return next(iter(schema.metadata.tables[name].c)).name
