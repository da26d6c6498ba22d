"""The views of DESIGN §5 as pandas DataFrames, for analysts. Reads the database only.

>>> from atlas_dagster import analytics
>>> analytics.operation_runs(connection="contoso", type="inventory.sync")
>>> analytics.inventory(connection="contoso", policy_type="settings_catalog")
>>> analytics.assignments(connection="contoso", group="All Staff")
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import sqlalchemy as sa

from atlas_dagster.config import load_config
from atlas_dagster.db import engine_for


def _engine(database_url: str | None) -> sa.Engine:
    # No migration and no config sync here: analytics must never write.
    return engine_for(database_url or load_config().database_url)


def _view(name: str) -> sa.TableClause:
    columns = {
        "v_operation_runs": ("provider_connection", "type", "status", "created_at"),
        "v_inventory_current": (
            "provider_connection",
            "policy_type",
            "contract_key",
            "last_seen_at",
        ),
        "v_assignments_readable": ("provider_connection", "group_name", "group_id", "policy_type"),
    }[name]
    return sa.table(name, *(sa.column(c) for c in columns))


def _read(query: sa.Select, database_url: str | None) -> pd.DataFrame:
    with _engine(database_url).connect() as conn:
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
    v = _view("v_operation_runs")
    q = sa.select(sa.text("*")).select_from(v)
    if connection:
        q = q.where(v.c.provider_connection == connection)
    if type:
        q = q.where(v.c.type == type)
    if status:
        q = q.where(v.c.status == status)
    if since:
        q = q.where(v.c.created_at >= since)
    if until:
        q = q.where(v.c.created_at < until)
    return _read(q.order_by(v.c.created_at.desc()), database_url)


def inventory(
    connection: str | None = None,
    policy_type: str | None = None,
    contract_key: str | None = None,
    seen_since: datetime | None = None,
    database_url: str | None = None,
) -> pd.DataFrame:
    """``v_inventory_current``: the policies that exist now."""
    v = _view("v_inventory_current")
    q = sa.select(sa.text("*")).select_from(v)
    if connection:
        q = q.where(v.c.provider_connection == connection)
    if policy_type:
        q = q.where(v.c.policy_type == policy_type)
    if contract_key:
        q = q.where(v.c.contract_key == contract_key)
    if seen_since:
        q = q.where(v.c.last_seen_at >= seen_since)
    return _read(q, database_url)


def assignments(
    connection: str | None = None,
    group: str | None = None,
    policy_type: str | None = None,
    database_url: str | None = None,
) -> pd.DataFrame:
    """``v_assignments_readable``: which policies target which group (by name or id)."""
    v = _view("v_assignments_readable")
    q = sa.select(sa.text("*")).select_from(v)
    if connection:
        q = q.where(v.c.provider_connection == connection)
    if group:
        q = q.where(sa.or_(v.c.group_name == group, v.c.group_id == group))
    if policy_type:
        q = q.where(v.c.policy_type == policy_type)
    return _read(q, database_url)
