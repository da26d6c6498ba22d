"""A PostgreSQL role for analysts and dashboards: reads every atlas table and view, writes none."""

from __future__ import annotations

import re

from sqlalchemy.engine import Engine

from atlas_dagster.schema import CACHED_TABLES, VIEWS

_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def grant_readonly(engine: Engine, role: str) -> None:
    if not _ROLE.match(role):
        raise ValueError(f"not a plain PostgreSQL role name: {role!r}")
    relations = [*CACHED_TABLES, *VIEWS, "alembic_version"]
    with engine.begin() as conn:
        exists = conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).first()
        if exists is None:
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        for name in relations:
            # Revoke first: a role granted more in the past must end up read-only.
            conn.exec_driver_sql(f'REVOKE ALL ON "{schema}"."{name}" FROM "{role}"')
            conn.exec_driver_sql(f'GRANT SELECT ON "{schema}"."{name}" TO "{role}"')
        conn.exec_driver_sql(f'REVOKE CREATE ON SCHEMA "{schema}" FROM "{role}"')
        conn.exec_driver_sql(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{schema}" FROM "{role}"')
