"""``provider_connection_checks``: the latest readiness of each contract per connection.

Written by verification, and by any sync or backup that meets a 403, so the table stays true
between verifications.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from atlas_dagster import schema
from atlas_dagster.reasons import PROVIDER_PERMISSION_DENIED, GraphError
from atlas_dagster.stores import bulk
from graph_contracts import CONTRACTS

READY = "ready"
MISSING_PERMISSION = "missing_permission"
PROBE_FAILED = "probe_failed"
# Write readiness only: Graph takes no writes of the collection.
NOT_WRITABLE = "not_writable"

_WRITE_FIELDS = ("write_status", "write_missing_permissions")


def record_checks(
    engine: Engine,
    provider_connection_id: int,
    checks: Iterable[dict],
    operation_run_id: int | None,
) -> None:
    """Upsert check rows: dicts with contract_key, status, missing_permissions, reason_code,
    message, and optionally write_status and write_missing_permissions. A check without
    write_status leaves the stored write readiness as it was: the upsert updates only the
    columns a row carries, and a 403 met by a read says nothing about writes."""
    now = schema.utcnow()
    rows = [
        {
            "provider_connection_id": provider_connection_id,
            "contract_key": c["contract_key"],
            "status": c["status"],
            "missing_permissions": list(c.get("missing_permissions") or []),
            "reason_code": c.get("reason_code"),
            "message": c.get("message"),
            "checked_at": now,
            "operation_run_id": operation_run_id,
            **({f: c.get(f) for f in _WRITE_FIELDS} if "write_status" in c else {}),
        }
        for c in checks
    ]
    with engine.begin() as conn:
        bulk.upsert(
            conn,
            schema.provider_connection_checks,
            rows,
            ("provider_connection_id", "contract_key"),
        )


def record_denied(
    engine: Engine, provider_connection_id: int, err: GraphError, operation_run_id: int | None
) -> None:
    """A 403 met outside verification marks that contract as missing a permission."""
    if err.reason_code != PROVIDER_PERMISSION_DENIED or not err.contract_key:
        return
    contract = CONTRACTS.get(err.contract_key)
    record_checks(
        engine,
        provider_connection_id,
        [
            {
                "contract_key": err.contract_key,
                "status": MISSING_PERMISSION,
                "missing_permissions": list(contract.permissions) if contract else [],
                "reason_code": err.reason_code,
                "message": err.message,
            }
        ],
        operation_run_id,
    )


def latest_checks(engine: Engine, provider_connection_id: int) -> list[dict]:
    t = schema.provider_connection_checks
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t)
            .where(t.c.provider_connection_id == provider_connection_id)
            .order_by(t.c.contract_key)
        )
        return [dict(r._mapping) for r in rows]
