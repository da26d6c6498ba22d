"""Bulk upserts keep every value exactly, on both backends (PostgreSQL goes through COPY)."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from atlas_dagster import db, schema
from atlas_dagster.stores import bulk


def _group(group_id: str, now: datetime, **values):
    row = {
        "provider_connection_id": 1,
        "group_id": group_id,
        "display_name": None,
        "mail": None,
        "mail_nickname": None,
        "security_enabled": None,
        "mail_enabled": None,
        "group_types": [],
        "membership_rule": None,
        "created_at": None,
        "first_seen_at": now,
        "last_seen_at": now,
        "deleted_at": None,
    }
    row.update(values)
    return row


def test_tricky_values_round_trip_and_partial_rows_update_only_their_columns(database_url):
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    with engine.begin() as conn:
        conn.execute(
            schema.provider_connections.insert().values(
                key="k", display_name="d", created_at=now, updated_at=now
            )
        )
    rows = [
        _group(
            "g1",
            now,
            display_name='quote " comma , newline \n tab \t',
            mail="",
            mail_nickname="\\N",  # spelled like the COPY stream's NULL, must stay a string
            security_enabled=True,
            mail_enabled=False,
            group_types=["Unified", 'x"y'],
            created_at=now,
        ),
        _group("g2", now, display_name="ünïcödé ✓", membership_rule=""),
        _group("g2", now, display_name="the later sight of g2 wins"),
    ]
    t = schema.directory_groups
    with engine.begin() as conn:
        bulk.upsert(conn, t, rows, ("provider_connection_id", "group_id"))
    with engine.connect() as conn:
        got = {r.group_id: dict(r._mapping) for r in conn.execute(sa.select(t))}
    assert got["g1"] == rows[0]
    assert got["g2"] == rows[2]
    # A partial row (a delta page naming only what changed) leaves the other columns alone.
    # Columns shared by every row (here part of the key, a timestamp and a NULL) go as constants.
    later = now.replace(year=now.year + 1)
    with engine.begin() as conn:
        bulk.upsert(
            conn,
            t,
            [{"group_id": "g1", "display_name": "renamed"}, {"group_id": "g3", "mail": "\\N"}],
            ("provider_connection_id", "group_id"),
            update=[c.name for c in t.c if c.name != "first_seen_at"],
            constants={
                "provider_connection_id": 1,
                "first_seen_at": later,
                "last_seen_at": later,
                "deleted_at": None,
            },
        )
    with engine.connect() as conn:
        got = {r.group_id: dict(r._mapping) for r in conn.execute(sa.select(t))}
    assert got["g1"] == {**rows[0], "display_name": "renamed", "last_seen_at": later}
    assert got["g2"] == rows[2]
    assert got["g3"] == {
        **{c.name: None for c in t.c},
        "provider_connection_id": 1,
        "group_id": "g3",
        "mail": "\\N",
        "first_seen_at": later,
        "last_seen_at": later,
    }


def test_rows_that_repeat_a_constant_column_are_refused(database_url):
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    with engine.begin() as conn, pytest.raises(ValueError, match="provider_connection_id"):
        bulk.upsert(
            conn,
            schema.directory_groups,
            [{"provider_connection_id": 1, "group_id": "g"}],
            ("provider_connection_id", "group_id"),
            constants={"provider_connection_id": 1},
        )
