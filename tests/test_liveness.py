"""Liveness of ledger rows: dead work is recognised and reaped, a tenant runs one thing at a
time, and work that lost its row cannot write (issue: the ledger tells the truth when runs die)."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from atlas_dagster import db, schema
from atlas_dagster.ledger import liveness
from atlas_dagster.ledger.job import FencedEngine, claim
from atlas_dagster.ledger.reconcile import reap_dead, row_dead_reason
from atlas_dagster.ledger.store import FencedOut, OperationLedger


def _start(ledger: OperationLedger, run_type: str = "inventory.sync", **kw):
    return ledger.start(
        run_type,
        provider_connection_id=db.connection_ids(ledger.engine)["contoso"],
        trigger_source="cli",
        initiator="t",
        **kw,
    )


def _dead_process() -> liveness.Executor:
    """An executor record of a process that ran on this host and is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    import psutil

    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    me = liveness.here()
    return liveness.Executor(me.host, me.boot_id, proc.pid, started)


def test_dead_reason_names_a_gone_process_a_reboot_and_a_silent_remote_host():
    now = schema.utcnow()
    me = liveness.here()
    fresh = now - timedelta(seconds=1)
    assert liveness.dead_reason(me.to_dict(), fresh, now) is None
    gone = _dead_process()
    assert f"process {gone.pid}" in liveness.dead_reason(gone.to_dict(), fresh, now)
    rebooted = liveness.Executor(me.host, "another-boot", me.pid, me.process_started)
    assert "restarted" in liveness.dead_reason(rebooted.to_dict(), fresh, now)
    # On another host only the heartbeat tells: fresh is alive, stale past the bound is dead.
    remote = liveness.Executor("elsewhere", "b", 1, 0.0).to_dict()
    assert liveness.dead_reason(remote, fresh, now) is None
    stale = now - liveness.STALE_AFTER - timedelta(seconds=1)
    assert "no heartbeat" in liveness.dead_reason(remote, stale, now)
    assert timedelta(seconds=60) >= liveness.STALE_AFTER
    # A row whose work nobody claimed yet is judged by its Dagster run, not here.
    assert liveness.dead_reason(None, None, now) is None


def test_a_start_that_meets_a_dead_holder_reaps_it_and_takes_the_identity(ledger):
    gone = _dead_process()
    first = _start(ledger, executor=gone.to_dict(), executor_token="t1")
    assert first.created
    met = _start(ledger)
    assert not met.created and met.row.id == first.row.id
    assert row_dead_reason(met.row) is not None
    assert reap_dead(ledger, None) == [first.row.id]
    old = ledger.get(first.row.id)
    assert (old.status, old.outcome) == ("completed", "failed")
    assert old.failure_summary[0]["reason_code"] == "run_crashed"
    assert str(gone.pid) in old.failure_summary[0]["message"]
    again = _start(ledger)
    assert again.created and again.row.id != first.row.id


def test_a_row_on_another_host_is_reaped_only_once_its_heartbeat_is_stale(ledger):
    remote = liveness.Executor("worker-7", "b", 4242, 1.0).to_dict()
    row = _start(ledger, executor=remote, executor_token="t").row
    assert reap_dead(ledger, None) == []
    later = schema.utcnow() + liveness.STALE_AFTER + timedelta(seconds=1)
    assert reap_dead(ledger, None, now=later) == [row.id]
    assert ledger.get(row.id).outcome == "failed"


def test_one_running_row_per_tenant_whatever_its_type(ledger):
    me = liveness.here().to_dict()
    sync = _start(ledger).row
    verify = _start(ledger, "provider_connection.verify").row
    assert ledger.take_executor(sync.id, me, "a") and ledger.take_executor(verify.id, me, "b")
    assert ledger.take_slot(sync.id, "a") is None
    holder = ledger.take_slot(verify.id, "b")
    assert holder is not None and holder.id == sync.id
    assert ledger.get(verify.id).status == "queued"
    assert ledger.complete(sync.id, "succeeded", token="a")
    assert ledger.take_slot(verify.id, "b") is None
    assert ledger.get(verify.id).status == "running"


def test_a_claim_waits_for_the_tenants_running_row_and_says_so(ledger):
    import dagster as dg

    from atlas_dagster.ledger.run_types import TAG_OPERATION_RUN_ID

    me = liveness.here().to_dict()
    holder = _start(ledger).row
    assert ledger.take_executor(holder.id, me, "h") and ledger.take_slot(holder.id, "h") is None
    waiting = _start(ledger, "provider_connection.verify").row
    run = dg.DagsterRun(
        job_name="provider_connection_verify_job",
        run_id="waiting-run",
        tags={TAG_OPERATION_RUN_ID: str(waiting.id)},
    )
    said = threading.Event()
    messages: list[str] = []
    handles = []

    def say(text: str) -> None:
        messages.append(text)
        said.set()

    worker = threading.Thread(target=lambda: handles.append(claim(ledger, run, say=say)))
    worker.start()
    assert said.wait(30), "the claim should say that it waits"
    assert f"#{holder.id}" in messages[0]
    assert ledger.get(waiting.id).status == "queued"
    assert ledger.complete(holder.id, "succeeded", token="h")
    worker.join(30)
    assert handles and ledger.get(waiting.id).status == "running"
    handles[0].close()


def test_a_write_fenced_out_commits_nothing(ledger):
    me = liveness.here().to_dict()
    row = _start(ledger).row
    assert ledger.take_executor(row.id, me, "tok") and ledger.take_slot(row.id, "tok") is None
    fenced = FencedEngine(ledger.engine, ledger, row.id, "tok")
    groups = schema.directory_groups
    conn_id = row.provider_connection_id
    values = {
        "provider_connection_id": conn_id,
        "display_name": "before",
        "first_seen_at": schema.utcnow(),
        "last_seen_at": schema.utcnow(),
    }
    with fenced.begin() as conn:
        conn.execute(groups.insert().values(group_id="g1", **values))
    # The reconciler completes the row underneath the work.
    assert ledger.complete(row.id, "failed")
    with pytest.raises(FencedOut), fenced.begin() as conn:
        conn.execute(groups.insert().values(group_id="g2", **values))
    assert not ledger.record_progress(row.id, summary_counts={"late": 1}, token="tok")
    with ledger.engine.connect() as conn:
        ids = conn.execute(sa.select(groups.c.group_id)).scalars().all()
    assert ids == ["g1"]
    assert ledger.get(row.id).summary_counts == {}
