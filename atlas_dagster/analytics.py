"""The human views (v_operation_runs, v_inventory_current, v_assignments_readable) as pandas
DataFrames, for analysts. Reads the database only.

>>> from atlas_dagster import analytics
>>> analytics.operation_runs(connection="contoso", type="inventory.sync")
>>> analytics.inventory(connection="contoso", policy_type="settings_catalog")
>>> analytics.assignments(connection="contoso", group="All Staff")
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa

from atlas_dagster.config import load_config
from atlas_dagster.db import engine_for, read_connection
from atlas_dagster.stores import bulk


def _engine(database_url: str | None) -> sa.Engine:
    # No migration and no config sync here: analytics must never write.
    return engine_for(database_url or load_config().database_url)


def _query(
    view: str,
    equals: dict[str, Any],
    *,
    at_least: tuple[str, datetime | None] | None = None,
    below: tuple[str, datetime | None] | None = None,
) -> sa.Select:
    """SELECT * FROM view WHERE column = value (for each value given) and the time bounds."""
    q = sa.select(sa.text("*")).select_from(sa.table(view))
    for column, value in equals.items():
        if value is not None:
            q = q.where(sa.column(column) == value)
    if at_least and at_least[1] is not None:
        q = q.where(sa.column(at_least[0]) >= at_least[1])
    if below and below[1] is not None:
        q = q.where(sa.column(below[0]) < below[1])
    return q


def _read(query: sa.Select, database_url: str | None) -> pd.DataFrame:
    # A read connection whatever pandas runs first: it never waits for a writer.
    with read_connection(_engine(database_url)) as conn:
        return pd.read_sql_query(query, conn)


def operation_runs(
    connection: str | None = None,
    type: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    database_url: str | None = None,
) -> pd.DataFrame:
    """``v_operation_runs``, newest first, with the Dagster run URL."""
    q = _query(
        "v_operation_runs",
        {"provider_connection": connection, "type": type, "status": status},
        at_least=("created_at", since),
        below=("created_at", until),
    )
    return _read(q.order_by(sa.column("created_at").desc()), database_url)


def inventory(
    connection: str | None = None,
    policy_type: str | None = None,
    contract_key: str | None = None,
    seen_since: datetime | None = None,
    database_url: str | None = None,
) -> pd.DataFrame:
    """``v_inventory_current``: the policies that exist now; ``payload`` is each policy exactly
    as Graph returned it (a dict, with any NUL the store had to escape restored)."""
    q = _query(
        "v_inventory_current",
        {
            "provider_connection": connection,
            "policy_type": policy_type,
            "contract_key": contract_key,
        },
        at_least=("last_seen_at", seen_since),
    )
    frame = _read(q, database_url)
    frame["payload"] = frame["payload"].map(_payload)
    return frame


def _payload(stored: Any) -> Any:
    # SQLite hands JSON columns of a view back as text, PostgreSQL as decoded values.
    return bulk.decode_json(json.loads(stored) if isinstance(stored, str) else stored)


def assignments(
    connection: str | None = None,
    group: str | None = None,
    policy_type: str | None = None,
    database_url: str | None = None,
) -> pd.DataFrame:
    """``v_assignments_readable``: which policies target which group (by name or id)."""
    q = _query(
        "v_assignments_readable", {"provider_connection": connection, "policy_type": policy_type}
    )
    if group:
        q = q.where(sa.or_(sa.column("group_name") == group, sa.column("group_id") == group))
    return _read(q, database_url)
