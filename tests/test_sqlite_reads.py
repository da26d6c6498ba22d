"""SQLite: a read never waits for a writer, and writers still take the write lock up front."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from atlas_dagster import analytics, db, schema
from atlas_dagster.config import load_config, parse_config
from atlas_dagster.ledger.store import OperationLedger
from tests.conftest import write_config

# Bounds a read that wrongly waits for the writer (busy_timeout would hold it for 60 s); a read
# that does not wait takes milliseconds.
READ_BOUND_S = 20
# The same for the CLI, whose start-up (importing Dagster) takes seconds of its own.
CLI_BOUND_S = 180


def _file(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _journal_mode(path: str) -> str:
    probe = sqlite3.connect(path)
    try:
        return probe.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        probe.close()


def _write_lock_is_free(path: str) -> bool:
    """Whether another connection could start writing right now, without waiting."""
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    else:
        probe.execute("ROLLBACK")
        return True
    finally:
        probe.close()


@contextmanager
def _writer_holding_the_lock(engine: sa.Engine, committed_id: int) -> Iterator[None]:
    """A write transaction of the product's own kind, open, with an uncommitted insert."""
    runs = schema.operation_runs
    with engine.connect() as conn, conn.begin():
        row = conn.execute(sa.select(runs).where(runs.c.id == committed_id)).one()
        copy = dict(row._mapping, id=None, run_identity_hash="uncommitted")
        conn.execute(runs.insert().values(**copy))
        yield


def _bounded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` run on another thread while this one keeps its transaction open."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=READ_BOUND_S)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture
def config_file(tmp_path, sqlite_url) -> Path:
    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    engine = db.engine_for(sqlite_url)
    db.upgrade(engine)
    db.sync_config(engine, load_config(cfg))
    return cfg


@pytest.mark.parametrize("journal", ["wal", "delete"], ids=["new-file", "rollback-journal-file"])
def test_reads_return_the_last_commit_while_a_writer_holds_the_lock(
    config_file, sqlite_url, journal
):
    engine = db.engine_for(sqlite_url)
    ledger = OperationLedger(engine)
    conn_id = db.connection_ids(engine)["contoso"]
    committed = ledger.start(
        "inventory.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="a"
    ).row
    path = _file(sqlite_url)
    if journal == "delete":
        # A database file from before WAL: the first connection after an upgrade converts it.
        engine.dispose()
        sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").close()
        assert _journal_mode(path) == "delete"

    with _writer_holding_the_lock(engine, committed.id):
        assert not _write_lock_is_free(path)
        revision = _bounded(db.current_revision, engine)
        synced = _bounded(db.sync_config, engine, load_config(config_file))
        listed = _bounded(ledger.list)
        frame = _bounded(analytics.operation_runs, connection="contoso", database_url=sqlite_url)
        # Every one returned while this transaction still held the write lock.
        assert not _write_lock_is_free(path)

    assert revision == db.head_revision() and synced == {"contoso": conn_id}
    assert [r.id for r in listed] == [committed.id]
    assert list(frame["id"]) == [committed.id]
    assert _journal_mode(path) == "wal"
    assert len(ledger.list()) == 2  # the writer's insert, committed once it let go


def test_the_runs_command_answers_while_a_writer_holds_the_lock(config_file, sqlite_url):
    engine = db.engine_for(sqlite_url)
    conn_id = db.connection_ids(engine)["contoso"]
    committed = (
        OperationLedger(engine)
        .start(
            "inventory.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="a"
        )
        .row
    )
    with _writer_holding_the_lock(engine, committed.id):
        done = subprocess.run(
            [sys.executable, "-m", "atlas_dagster.cli", "runs", "--json"],
            env={**os.environ, "ATLAS_CONFIG": str(config_file)},
            capture_output=True,
            text=True,
            timeout=CLI_BOUND_S,
        )
        assert not _write_lock_is_free(_file(sqlite_url))
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in json.loads(done.stdout)["operation_runs"]] == [committed.id]


def test_writes_take_the_lock_at_begin_and_reads_never_do(config_file, sqlite_url):
    path, engine = _file(sqlite_url), db.engine_for(sqlite_url)
    runs = schema.operation_runs
    with engine.begin():
        assert not _write_lock_is_free(path)  # before it has run a single statement
    with engine.connect() as conn:
        conn.execute(sa.select(runs)).all()
        assert conn.in_transaction() and _write_lock_is_free(path)
        conn.rollback()
        with conn.begin():  # the same connection, now writing
            assert not _write_lock_is_free(path)
    with db.read_connection(engine) as conn:
        conn.exec_driver_sql("PRAGMA main.table_info('operation_runs')").all()
        assert conn.in_transaction() and _write_lock_is_free(path)
    with engine.connect() as conn:
        # A write on a plain connection is a writer's from its first statement.
        conn.execute(schema.atlas_settings.insert().values(key="probe", value="1"))
        assert not _write_lock_is_free(path)
        conn.commit()
    with engine.begin():  # its pooled connection, reused after all those reads
        assert not _write_lock_is_free(path)


CHANGED = """\
provider_connections:
  - key: contoso
    display_name: Contoso Ltd
    simulated: {profile: small, seed: 1}
  - key: fabrikam
    simulated: {profile: small, seed: 2}
backup_schedules:
  - key: fabrikam-nightly
    provider_connection: fabrikam
    cron: "0 3 * * *"
"""


def test_sync_config_takes_the_write_lock_only_for_a_config_that_differs(config_file, sqlite_url):
    engine = db.engine_for(sqlite_url)
    begins: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        if statement.startswith("BEGIN"):
            begins.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        before = db.sync_config(engine, load_config(config_file))
        assert "BEGIN IMMEDIATE" not in begins
        after = db.sync_config(engine, parse_config(CHANGED, "atlas.yaml", {}))
        assert begins.count("BEGIN IMMEDIATE") == 1
        db.sync_config(engine, parse_config(CHANGED, "atlas.yaml", {}))
        assert begins.count("BEGIN IMMEDIATE") == 1
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)

    assert after["contoso"] == before["contoso"] and set(after) == {"contoso", "fabrikam"}
    pc, bs = schema.provider_connections, schema.backup_schedules
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(pc.c.key, pc.c.display_name)).all())
        schedules = {
            r.key: (r.provider_connection_id, r.cron, r.enabled)
            for r in conn.execute(sa.select(bs))
        }
    assert names == {"contoso": "Contoso Ltd", "fabrikam": "fabrikam"}
    assert schedules == {
        "contoso-nightly": (after["contoso"], "0 2 * * *", False),  # removed: kept, disabled
        "fabrikam-nightly": (after["fabrikam"], "0 3 * * *", True),
    }
