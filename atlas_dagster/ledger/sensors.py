"""The ledger's sensors: run-status mirrors and the reconciler."""

from __future__ import annotations

import logging

import dagster as dg
from dagster import DagsterRunStatus

from atlas_dagster.ledger.mirror import mirror_run_id
from atlas_dagster.ledger.reconcile import reconcile
from atlas_dagster.resources.ledger import LedgerResource

log = logging.getLogger("atlas_dagster.ledger.sensors")


def _on_status(context: dg.RunStatusSensorContext, ledger: LedgerResource) -> None:
    try:
        mirror_run_id(ledger.ledger(), context.instance, context.dagster_run.run_id)
    except Exception:
        log.exception("run-status mirror failed for %s", context.dagster_run.run_id)


def _status_sensor(status: DagsterRunStatus, name: str):
    @dg.run_status_sensor(
        run_status=status,
        name=name,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Mirrors {status.value} runs into operation_runs.",
    )
    def _sensor(context: dg.RunStatusSensorContext, ledger: LedgerResource):
        _on_status(context, ledger)

    return _sensor


mirror_sensors = [
    _status_sensor(DagsterRunStatus.STARTED, "operation_runs_mirror_started"),
    _status_sensor(DagsterRunStatus.SUCCESS, "operation_runs_mirror_success"),
    _status_sensor(DagsterRunStatus.FAILURE, "operation_runs_mirror_failure"),
    _status_sensor(DagsterRunStatus.CANCELED, "operation_runs_mirror_canceled"),
]


@dg.sensor(
    name="operation_runs_reconciler",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes operation_runs converge on Dagster's run records (dropped events, crashed "
    "workers, runs from before the sensors started, starts that were never dispatched).",
)
def operation_runs_reconciler(context: dg.SensorEvaluationContext, ledger: LedgerResource):
    cursor = float(context.cursor) if context.cursor else None
    try:
        result = reconcile(ledger.ledger(), context.instance, cursor)
    except Exception:
        log.exception("reconciliation pass failed; retrying next tick")
        return dg.SkipReason("reconciliation pass failed; see the daemon log")
    if result.cursor is not None:
        context.update_cursor(str(result.cursor))
    return dg.SkipReason(
        f"mirrored {result.mirrored} run(s), reaped {len(result.reaped)} dead row(s), "
        f"expired {len(result.expired)} undispatched row(s)"
        + (f", {result.errors} failed and will be retried" if result.errors else "")
    )
