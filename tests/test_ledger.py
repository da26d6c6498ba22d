"""The operation ledger on both backends: identity, dedupe in the database, forward-only rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from atlas_dagster import db, schema
from atlas_dagster.ledger.store import FencedOut, LedgerError, OperationLedger, related_links
from atlas_dagster.reasons import failure


def _conn(ledger: OperationLedger, key: str) -> int:
    return db.connection_ids(ledger.engine)[key]


def test_migrations_build_exactly_the_schema(database_url):
    engine = db.engine_for(database_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
        views = set(sa.inspect(conn).get_view_names())
    assert diff == []
    assert views == set(schema.VIEWS)


def test_32_concurrent_deterministic_starts_make_one_active_row(ledger):
    conn_id = _conn(ledger, "contoso")

    def start(i: int):
        return ledger.start(
            "inventory.sync",
            provider_connection_id=conn_id,
            trigger_source="cli",
            initiator=f"u{i}",
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(start, range(32)))
    assert sum(r.created for r in results) == 1
    assert {r.row.id for r in results} == {results[0].row.id}
    with ledger.engine.connect() as c:
        count = c.execute(sa.select(sa.func.count()).select_from(schema.operation_runs)).scalar()
    assert count == 1


def test_other_connection_or_scope_is_another_identity(ledger):
    a = ledger.start(
        "inventory.sync",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="x",
    )
    b = ledger.start(
        "inventory.sync",
        provider_connection_id=_conn(ledger, "fabrikam"),
        trigger_source="cli",
        initiator="x",
    )
    c = ledger.start(
        "directory_groups.sync",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="x",
    )
    assert len({a.row.id, b.row.id, c.row.id}) == 3 and a.created and b.created and c.created


def test_deterministic_identity_is_free_again_once_completed(ledger):
    conn_id = _conn(ledger, "contoso")
    first = ledger.start(
        "inventory.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="x"
    )
    assert ledger.complete(first.row.id, "succeeded")
    second = ledger.start(
        "inventory.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="x"
    )
    assert second.created and second.row.id != first.row.id


def test_nonce_types_create_one_row_per_start(ledger):
    conn_id = _conn(ledger, "contoso")

    def start(_):
        return ledger.start(
            "backup_schedule.run_now",
            provider_connection_id=conn_id,
            trigger_source="cli",
            initiator="x",
            context={"backup_schedule_id": 1},
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(start, range(16)))
    assert all(r.created for r in results)
    assert len({r.row.id for r in results}) == 16
    assert len({r.row.context["nonce"] for r in results}) == 16


def test_strict_scheduled_identity_exists_once_in_any_status(ledger):
    conn_id = _conn(ledger, "contoso")
    ctx = {"backup_schedule_id": 1, "scheduled_for": "2026-11-27T01:00:00+00:00"}

    def start():
        return ledger.start(
            "backup_schedule.scheduled",
            provider_connection_id=conn_id,
            trigger_source="schedule",
            initiator="backup_schedule__contoso-nightly",
            context=ctx,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        racing = list(pool.map(lambda _: start(), range(8)))
    assert sum(r.created for r in racing) == 1
    first = racing[0].row
    assert ledger.complete(first.id, "succeeded")
    again = start()
    assert not again.created and again.row.id == first.id and again.row.status == "completed"
    next_tick = ledger.start(
        "backup_schedule.scheduled",
        provider_connection_id=conn_id,
        trigger_source="schedule",
        initiator="s",
        context={**ctx, "scheduled_for": "2026-11-28T01:00:00+00:00"},
    )
    assert next_tick.created


def test_rows_only_move_forward(ledger):
    row = ledger.start(
        "inventory.sync",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="x",
    ).row
    assert row.status == "queued" and row.outcome == "pending"
    assert ledger.take_executor(row.id, {"host": "h", "pid": 1, "process_started": 0}, "tok")
    assert ledger.take_slot(row.id, "tok", dagster_run_id="r1") is None
    assert ledger.complete(row.id, "failed", failures=[failure("provider_throttled", "429s")])
    # Terminal rows never move back, nor change outcome, nor take more failures.
    with pytest.raises(FencedOut):
        ledger.take_slot(row.id, "tok")
    assert not ledger.take_executor(row.id, {"host": "h", "pid": 1, "process_started": 0}, "t2")
    assert not ledger.complete(row.id, "succeeded")
    assert not ledger.record_progress(row.id, failures=[failure("internal_error", "late")])
    final = ledger.get(row.id)
    assert (final.status, final.outcome) == ("completed", "failed")
    assert [f["reason_code"] for f in final.failure_summary] == ["provider_throttled"]
    assert final.started_at is not None and final.completed_at >= final.started_at
    with pytest.raises(LedgerError):
        ledger.complete(row.id, "pending")


def test_progress_merges_counts_and_appends_failures(ledger):
    row = ledger.start(
        "inventory.sync",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="x",
    ).row
    ledger.record_progress(row.id, summary_counts={"items": 3})
    ledger.record_progress(
        row.id,
        summary_counts={"groups": 2},
        failures=[failure("provider_permission_denied", "403", "app_protection_ios")],
    )
    fresh = ledger.get(row.id)
    assert fresh.summary_counts == {"items": 3, "groups": 2}
    assert fresh.failure_summary == [
        {
            "reason_code": "provider_permission_denied",
            "message": "403",
            "contract_key": "app_protection_ios",
        }
    ]


def test_undispatched_rows_fail_after_grace(ledger):
    conn_id = _conn(ledger, "contoso")
    old = ledger.start(
        "inventory.sync",
        provider_connection_id=conn_id,
        trigger_source="cli",
        initiator="x",
        created_at=datetime.now(UTC) - timedelta(hours=1),
    ).row
    fresh = ledger.start(
        "directory_groups.sync", provider_connection_id=conn_id, trigger_source="cli", initiator="x"
    ).row
    assert ledger.expire_undispatched(timedelta(minutes=10)) == [old.id]
    expired = ledger.get(old.id)
    assert (expired.status, expired.outcome) == ("completed", "failed")
    assert expired.failure_summary[0]["reason_code"] == "dispatch_failed"
    assert ledger.get(fresh.id).status == "queued"


def test_context_keys_and_related_links(ledger):
    row = ledger.start(
        "backup_schedule.retry",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="alice",
        context={
            "backup_schedule_id": 1,
            "retry_of": 7,
            "backup_schedule_run_id": 12,
            "restore_run_id": 5,
            "provider_connection_key": "contoso",
        },
    ).row
    ledger.attach_dagster_run(row.id, "abc-123")
    row = ledger.get(row.id)
    for key in (
        "provider_connection_id",
        "backup_schedule_id",
        "retry_of",
        "trigger_source",
        "initiator",
        "nonce",
    ):
        assert key in row.context
    links = related_links(row, "http://dagster.local:3000/")
    assert links["dagster_run"] == "http://dagster.local:3000/runs/abc-123"
    assert (
        links["asset"]
        == "http://dagster.local:3000/assets/backups?view=partitions&partition=contoso"
    )
    assert "12" in links["backup_set"] and "7" in links["retry_of"]
    assert links["restore_run_id"] == "atlas-dagster runs --id 5"


def test_view_links_runs_to_the_dagster_ui(ledger):
    row = ledger.start(
        "inventory.sync",
        provider_connection_id=_conn(ledger, "contoso"),
        trigger_source="cli",
        initiator="x",
    ).row
    ledger.attach_dagster_run(row.id, "run-9")
    with ledger.engine.connect() as c:
        url, key = c.exec_driver_sql(
            "SELECT dagster_run_url, provider_connection FROM v_operation_runs WHERE id = :i".replace(
                ":i", str(row.id)
            )
        ).one()
    assert url == "http://127.0.0.1:3000/runs/run-9" and key == "contoso"


def test_unknown_run_type_is_refused(ledger):
    with pytest.raises(LedgerError):
        ledger.start(
            "inventory.explode", provider_connection_id=None, trigger_source="cli", initiator="x"
        )


def test_the_read_path_knows_alembics_head():
    assert db.head_revision() == db.HEAD_REVISION
