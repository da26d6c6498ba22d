"""The mirror and reconciler against a real Dagster instance (no daemon: passes are driven here)."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from atlas_dagster import db
from atlas_dagster.connections import ensure_partitions, provider_connection_partitions
from atlas_dagster.ledger import liveness
from atlas_dagster.ledger.job import operation_scope
from atlas_dagster.ledger.reconcile import reconcile
from atlas_dagster.ledger.run_types import LEDGER_JOBS, TAG_OPERATION_RUN_ID
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.ledger import LedgerResource
from tests.conftest import write_config


@dg.op
def sync_op(context: dg.OpExecutionContext, ledger: LedgerResource, database: DatabaseResource):
    with operation_scope(context, ledger) as handle:
        if context.run.tags.get("test/behaviour") == "raise":
            raise ValueError("exploded\nsecond line")
        handle.progress(items=5)


@dg.job(name="inventory_sync_job", partitions_def=provider_connection_partitions)
def fake_inventory_job():
    sync_op()


@pytest.fixture
def env(tmp_path, database_url):
    cfg = write_config(tmp_path / "atlas.yaml", database_url)
    database = DatabaseResource(config_path=str(cfg))
    ledger_res = LedgerResource(config_path=database.config_path)
    job = fake_inventory_job
    with dg.instance_for_test() as instance:
        ensure_partitions(instance, ["contoso"])
        yield {
            "instance": instance,
            "ledger": OperationLedger(database.engine()),
            "resources": {"ledger": ledger_res, "database": database},
            "job": job,
            "conn_id": db.connection_ids(database.engine())["contoso"],
        }


def _execute(env, tags, run_id=None):
    return env["job"].execute_in_process(
        instance=env["instance"],
        partition_key="contoso",
        tags=tags,
        resources=env["resources"],
        raise_on_error=False,
        run_id=run_id or make_new_run_id(),
    )


def _start(env):
    return (
        env["ledger"]
        .start(
            "inventory.sync",
            provider_connection_id=env["conn_id"],
            trigger_source="cli",
            initiator="t",
        )
        .row
    )


def test_job_name_is_tracked():
    assert "inventory_sync_job" in LEDGER_JOBS


def test_tagged_successful_run_completes_its_row_with_run_timestamps(env):
    row = _start(env)
    result = _execute(env, {TAG_OPERATION_RUN_ID: str(row.id)})
    assert result.success
    reconcile(env["ledger"], env["instance"], None)
    done = env["ledger"].get(row.id)
    record = env["instance"].get_run_record_by_id(result.run_id)
    assert (done.status, done.outcome, done.dagster_run_id) == (
        "completed",
        "succeeded",
        result.run_id,
    )
    assert done.summary_counts == {"items": 5}
    # The job completes its own row (freeing the tenant at once): its times lie inside the run.
    assert record.start_time <= done.started_at.timestamp() <= done.completed_at.timestamp()
    assert done.completed_at.timestamp() <= record.end_time


def test_a_re_execution_with_its_parents_tags_gets_a_row_of_its_own(env):
    row = _start(env)
    parent = _execute(env, {TAG_OPERATION_RUN_ID: str(row.id)})
    reconcile(env["ledger"], env["instance"], None)
    child = _execute(env, {TAG_OPERATION_RUN_ID: str(row.id)})  # the UI copies parent tags
    assert parent.success and child.success
    reconcile(env["ledger"], env["instance"], None)
    by_run = {r.dagster_run_id: r for r in env["ledger"].list()}
    assert by_run[parent.run_id].id == row.id
    assert by_run[child.run_id].id != row.id
    assert (by_run[child.run_id].status, by_run[child.run_id].outcome) == (
        "completed",
        "succeeded",
    )
    assert env["ledger"].get(row.id).dagster_run_id == parent.run_id


def test_failing_job_records_internal_error_one_line(env):
    row = _start(env)
    result = _execute(env, {TAG_OPERATION_RUN_ID: str(row.id), "test/behaviour": "raise"})
    assert not result.success
    reconcile(env["ledger"], env["instance"], None)
    done = env["ledger"].get(row.id)
    assert (done.status, done.outcome) == ("completed", "failed")
    assert done.failure_summary == [
        {"reason_code": "internal_error", "message": "ValueError: exploded"}
    ]


def test_untagged_run_gets_exactly_one_row_from_the_mirror(env):
    result = _execute(env, {})
    for _ in range(3):  # repeated passes and events are harmless
        reconcile(env["ledger"], env["instance"], None)
    rows = env["ledger"].list()
    assert len(rows) == 1
    row = rows[0]
    assert (row.type, row.status, row.outcome) == ("inventory.sync", "completed", "succeeded")
    assert (row.trigger_source, row.dagster_run_id) == ("dagster_ui", result.run_id)
    assert row.provider_connection_id == env["conn_id"]


def test_untagged_duplicate_does_not_work_while_identity_is_held(env):
    holder = _start(env)
    # The holder runs in this (live) process.
    assert env["ledger"].take_executor(holder.id, liveness.here().to_dict(), "holder")
    assert env["ledger"].take_slot(holder.id, "holder", dagster_run_id="other-run") is None
    result = _execute(env, {})
    assert not result.success
    reconcile(env["ledger"], env["instance"], None)
    dup = env["ledger"].find_by_dagster_run(result.run_id)
    assert (dup.status, dup.outcome) == ("completed", "cancelled")
    assert f"#{holder.id}" in dup.failure_summary[0]["message"]
    assert "items" not in dup.summary_counts
    assert env["ledger"].get(holder.id).status == "running"


def _created_run(env, row_id=None):
    tags = {"dagster/partition": "contoso"}
    if row_id is not None:
        tags[TAG_OPERATION_RUN_ID] = str(row_id)
    return env["instance"].create_run_for_job(env["job"], tags=tags, run_id=make_new_run_id())


def test_cancelled_run_completes_cancelled(env):
    row = _start(env)
    run = _created_run(env, row.id)
    env["ledger"].attach_dagster_run(row.id, run.run_id)
    env["instance"].report_run_canceled(run)
    reconcile(env["ledger"], env["instance"], None)
    done = env["ledger"].get(row.id)
    assert (done.status, done.outcome) == ("completed", "cancelled")
    assert done.failure_summary[0]["reason_code"] == "run_cancelled"


def test_run_failed_outside_steps_is_a_crash(env):
    row = _start(env)
    run = _created_run(env, row.id)
    env["instance"].report_run_failed(run, "Run worker process exited unexpectedly (SIGKILL)")
    reconcile(env["ledger"], env["instance"], None)
    done = env["ledger"].get(row.id)
    assert (done.status, done.outcome) == ("completed", "failed")
    assert done.failure_summary[0]["reason_code"] == "run_crashed"
    assert "SIGKILL" in done.failure_summary[0]["message"]


def test_row_whose_run_never_existed_fails_dispatch_after_grace(env):
    row = _start(env)
    env["ledger"].attach_dagster_run(row.id, make_new_run_id())
    reconcile(env["ledger"], env["instance"], None)
    assert env["ledger"].get(row.id).status == "queued"
    later = datetime.now(UTC) + timedelta(hours=1)
    result = reconcile(env["ledger"], env["instance"], None, now=later)
    done = env["ledger"].get(row.id)
    assert result.expired == [row.id]
    assert (done.outcome, done.failure_summary[0]["reason_code"]) == ("failed", "dispatch_failed")


def test_cursor_advances_and_nothing_stays_active(env):
    rows = [_start(env) for _ in range(1)]
    _execute(env, {TAG_OPERATION_RUN_ID: str(rows[0].id)})
    _execute(env, {})
    first = reconcile(env["ledger"], env["instance"], None)
    assert first.cursor is not None
    second = reconcile(env["ledger"], env["instance"], first.cursor)
    assert second.cursor >= first.cursor
    assert env["ledger"].active() == []
    assert len(env["ledger"].list()) == 2


def test_started_run_whose_worker_died_is_failed_as_crashed(env):
    import subprocess
    import sys

    from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData

    row = _start(env)
    run = _created_run(env, row.id)
    instance = env["instance"]
    instance.report_dagster_event(
        DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=run.job_name),
        run.run_id,
    )
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        instance.report_engine_event(
            f"Started process for run (pid: {worker.pid}).",
            run,
            EngineEventData.in_process(worker.pid),
        )
        reconcile(env["ledger"], instance, None)
        assert env["ledger"].get(row.id).status == "queued"  # alive: left alone
    finally:
        worker.kill()  # SIGKILL, as an OOM killer would
        worker.wait()
    reconcile(env["ledger"], instance, None)
    done = env["ledger"].get(row.id)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert (done.status, done.outcome) == ("completed", "failed")
    assert done.failure_summary[0]["reason_code"] == "run_crashed"
    assert str(worker.pid) in done.failure_summary[0]["message"]


def test_failures_recorded_before_a_crash_do_not_hide_the_crash(env):
    from atlas_dagster.reasons import failure

    row = _start(env)
    run = _created_run(env, row.id)
    env["ledger"].record_progress(
        row.id, failures=[failure("provider_unavailable", "timed out", "device_categories")]
    )
    env["instance"].report_run_failed(run, "Run worker process terminated by signal 9")
    reconcile(env["ledger"], env["instance"], None)
    done = env["ledger"].get(row.id)
    assert [f["reason_code"] for f in done.failure_summary] == [
        "provider_unavailable",
        "run_crashed",
    ]
