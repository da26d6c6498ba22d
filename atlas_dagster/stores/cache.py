"""What the tenant cache tables share: Graph timestamps as their columns hold them, how many of a
connection's rows are active, and when each connection was last refreshed."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa


def parse_graph_datetime(value: str | None) -> datetime | None:
    """A Graph timestamp ('Z', up to 7 fractional digits: Python 3.11 reads both, keeping 6),
    or None when there is none or it does not parse."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def active_rows(engine: sa.Engine, table: sa.Table, conn_id: int) -> int:
    """How many of a connection's cached rows are not soft-deleted."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(
                table.c.provider_connection_id == conn_id, table.c.deleted_at.is_(None)
            )
        ).scalar_one()


def latest_refresh(engine: sa.Engine, stamp: sa.ColumnElement) -> dict[int, datetime]:
    """Per connection id, the newest ``stamp`` (a timestamp column of a table that carries
    ``provider_connection_id``); a connection never refreshed is absent."""
    table = stamp.table
    with engine.connect() as conn:
        return dict(
            conn.execute(
                sa.select(table.c.provider_connection_id, sa.func.max(stamp)).group_by(
                    table.c.provider_connection_id
                )
            ).all()
        )
