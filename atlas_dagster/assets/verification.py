"""Verification (run type ``provider_connection.verify``): can we sign in, and which permissions
are missing for which policy types.

Steps: sign in; read the granted application permissions from the token's ``roles`` claim;
compare each contract's required permissions; probe each readable contract with one minimal
request. The result per contract lands in ``provider_connection_checks`` and in the ledger row.

Write readiness (restore) is reported per policy contract from the roles claim alone: a write
probe would change the tenant. It never changes the outcome: a read-only app registration is a
valid setup that just cannot restore.
"""

from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from atlas_dagster.assets.common import connection_for_run, int_metadata, table_metadata
from atlas_dagster.connections import provider_connection_partitions
from atlas_dagster.graph import GraphClient
from atlas_dagster.ledger.job import operation_scope
from atlas_dagster.ledger.run_types import Outcome
from atlas_dagster.reasons import (
    BLOCKING_FOR_VERIFICATION,
    PROVIDER_AUTH_FAILED,
    PROVIDER_PERMISSION_DENIED,
    GraphError,
    failure,
)
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.graph import GraphClientResource
from atlas_dagster.resources.ledger import LedgerResource
from atlas_dagster.stores.checks import (
    MISSING_PERMISSION,
    NOT_WRITABLE,
    PROBE_FAILED,
    READY,
    record_checks,
)
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, missing_permissions

VERIFIED_CONTRACTS: tuple[str, ...] = (*POLICY_CONTRACTS, "groups_delta")


@dataclass
class Verification:
    signed_in: bool
    roles: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    auth_error: GraphError | None = None

    def failures(self) -> list[dict[str, Any]]:
        if self.auth_error is not None:
            return [self.auth_error.as_failure()]
        out = []
        for c in self.checks:
            if c["status"] != READY:
                out.append(failure(c["reason_code"], c["message"], c["contract_key"]))
        return out

    def outcome(self) -> str:
        if not self.signed_in:
            return Outcome.FAILED  # nothing could be verified, whatever kept us from signing in
        reasons = {f["reason_code"] for f in self.failures()}
        if reasons & BLOCKING_FOR_VERIFICATION:
            return Outcome.FAILED
        return Outcome.PARTIALLY_SUCCEEDED if reasons else Outcome.SUCCEEDED

    def counts(self) -> dict[str, int]:
        statuses = [c["status"] for c in self.checks]
        write_statuses = [c["write_status"] for c in self.checks]
        return {
            "contracts_ready": statuses.count(READY),
            "contracts_missing_permission": statuses.count(MISSING_PERMISSION),
            "contracts_probe_failed": statuses.count(PROBE_FAILED),
            "contracts_write_ready": write_statuses.count(READY),
            "contracts_write_missing_permission": write_statuses.count(MISSING_PERMISSION),
        }


def write_readiness(key: str, roles: list[str]) -> dict[str, Any]:
    """The check fields saying whether the roles grant every permission of every write of a
    policy contract (None for a contract that is not a policy collection)."""
    contract = CONTRACTS[key]
    if not contract.policy:
        return {"write_status": None, "write_missing_permissions": None}
    if contract.writes is None:
        return {"write_status": NOT_WRITABLE, "write_missing_permissions": []}
    missing = sorted(
        {p for w in contract.writes.all for p in missing_permissions(w.permissions, roles)}
    )
    return {
        "write_status": MISSING_PERMISSION if missing else READY,
        "write_missing_permissions": missing,
    }


def verify_connection(
    client: GraphClient, contract_keys: tuple[str, ...] = VERIFIED_CONTRACTS
) -> Verification:
    try:
        claims = client.token_claims()
    except GraphError as exc:
        # Nothing is probed without a token; every contract is recorded as not ready, naming why.
        return Verification(
            signed_in=False,
            auth_error=exc,
            checks=[
                {
                    "contract_key": key,
                    "status": PROBE_FAILED,
                    "missing_permissions": [],
                    "reason_code": exc.reason_code,
                    "message": exc.message,
                    "write_status": None,
                    "write_missing_permissions": None,
                }
                for key in contract_keys
            ],
        )
    roles = sorted(str(r) for r in claims.get("roles") or [])
    result = Verification(signed_in=True, roles=roles)
    for key in contract_keys:
        writes = write_readiness(key, roles)
        missing = missing_permissions(CONTRACTS[key].permissions, roles)
        if missing:
            result.checks.append(
                {
                    "contract_key": key,
                    "status": MISSING_PERMISSION,
                    "missing_permissions": missing,
                    "reason_code": PROVIDER_PERMISSION_DENIED,
                    "message": f"grant the application permission {', '.join(missing)}",
                    **writes,
                }
            )
            continue
        try:
            client.probe(key)
        except GraphError as exc:
            if exc.reason_code == PROVIDER_AUTH_FAILED:
                raise
            result.checks.append(
                {
                    "contract_key": key,
                    "status": PROBE_FAILED,
                    "missing_permissions": [],
                    "reason_code": exc.reason_code,
                    "message": exc.message,
                    **writes,
                }
            )
            continue
        result.checks.append(
            {
                "contract_key": key,
                "status": READY,
                "missing_permissions": [],
                "reason_code": None,
                "message": None,
                **writes,
            }
        )
    return result


def checks_table(checks: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (
            c["contract_key"],
            CONTRACTS[c["contract_key"]].title if c["contract_key"] in CONTRACTS else "",
            c["status"],
            ", ".join(c.get("missing_permissions") or []) or (c.get("reason_code") or ""),
            _write_cell(c),
        )
        for c in checks
    ]


def _write_cell(check: dict[str, Any]) -> str:
    status = check.get("write_status") or ""
    missing = check.get("write_missing_permissions")
    return f"{status}: {', '.join(missing)}" if missing else status


@dg.asset(
    name="provider_connection_checks",
    partitions_def=provider_connection_partitions,
    group_name="tenant_readiness",
    description="Per contract: ready, missing_permission (with the permissions to grant) or "
    "probe_failed, and for policy types whether a restore could write them "
    "(table provider_connection_checks).",
    kinds={"python", "sql"},
)
def provider_connection_checks(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    ledger: LedgerResource,
    graph: GraphClientResource,
) -> dg.MaterializeResult:
    with operation_scope(context, ledger) as handle:
        connection, conn_id = connection_for_run(database, context.partition_key)
        result = verify_connection(graph.client(connection))
        record_checks(handle.fenced(database.engine()), conn_id, result.checks, handle.id)
        for entry in result.failures():
            handle.fail(entry["reason_code"], entry["message"], entry.get("contract_key"))
        handle.progress(**result.counts())
        handle.declare_outcome(result.outcome())
        context.log.info(f"verification of {connection.key}: {result.outcome()} {result.counts()}")
        return dg.MaterializeResult(
            metadata={
                "outcome": dg.MetadataValue.text(result.outcome().value),
                "signed_in": dg.MetadataValue.bool(result.signed_in),
                "granted_permissions": dg.MetadataValue.json(result.roles),
                **int_metadata(result.counts()),
                "operation_run_id": dg.MetadataValue.int(handle.id),
                "readiness": table_metadata(
                    (
                        ("contract", "string"),
                        ("policy_type", "string"),
                        ("status", "string"),
                        ("to_grant_or_reason", "string"),
                        ("write", "string"),
                    ),
                    checks_table(result.checks),
                ),
            }
        )


provider_connection_verify_job = dg.define_asset_job(
    "provider_connection_verify_job",
    selection=dg.AssetSelection.assets(provider_connection_checks),
    description="Run type provider_connection.verify: sign in, compare permissions, probe.",
)
