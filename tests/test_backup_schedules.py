"""Backup schedules: one Dagster schedule per config entry; a tick creates its ledger row (strict
identity: schedule + scheduled time) before it requests the run, and never requests twice."""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from atlas_dagster.config import load_config
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.run_types import TAG_BACKUP_SCHEDULE, TAG_OPERATION_RUN_ID, TAG_RUN_TYPE
from atlas_dagster.ledger.store import OperationLedger
from atlas_dagster.resources.database import DatabaseResource
from atlas_dagster.resources.ledger import LedgerResource
from tests.conftest import write_config

WEEKLY_DISABLED = """\
  - key: contoso-weekly
    provider_connection: contoso
    cron: "0 3 * * 0"
    timezone: UTC
    policy_types: [settings_catalog]
    retention_days: 90
    enabled: false
"""
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def env(tmp_path, database_url):
    cfg = write_config(tmp_path / "atlas.yaml", database_url, WEEKLY_DISABLED)
    database = DatabaseResource(config_path=str(cfg))
    defs = build_definitions(load_config(cfg))
    with dg.instance_for_test() as instance:
        yield {
            "defs": defs,
            "instance": instance,
            "ledger_resource": LedgerResource(config_path=database.config_path),
            "ledger": OperationLedger(database.engine()),
        }


def _tick(env, when: datetime, name: str = "backup_schedule__contoso_nightly"):
    schedule = env["defs"].get_schedule_def(name)
    with dg.build_schedule_context(
        instance=env["instance"],
        scheduled_execution_time=when,
        resources={"ledger": env["ledger_resource"]},
        repository_def=env["defs"].get_repository_def(),
    ) as context:
        return schedule.evaluate_tick(context)


def _scheduled_rows(env):
    return env["ledger"].list(type="backup_schedule.scheduled")


def test_each_config_entry_is_a_schedule_with_its_cron_timezone_and_job(env):
    nightly = env["defs"].get_schedule_def("backup_schedule__contoso_nightly")
    weekly = env["defs"].get_schedule_def("backup_schedule__contoso_weekly")
    assert (nightly.cron_schedule, nightly.execution_timezone) == ("0 2 * * *", "Europe/Berlin")
    assert (weekly.cron_schedule, weekly.execution_timezone) == ("0 3 * * 0", "UTC")
    assert nightly.job_name == weekly.job_name == "backup_job"


def test_enabled_schedule_runs_by_default_and_disabled_one_is_stopped(env):
    nightly = env["defs"].get_schedule_def("backup_schedule__contoso_nightly")
    weekly = env["defs"].get_schedule_def("backup_schedule__contoso_weekly")
    assert nightly.default_status == dg.DefaultScheduleStatus.RUNNING
    assert weekly.default_status == dg.DefaultScheduleStatus.STOPPED


def test_a_tick_creates_its_row_before_requesting_a_tagged_run(env):
    when = datetime(2026, 3, 1, 2, 0, tzinfo=BERLIN)
    result = _tick(env, when)
    [row] = _scheduled_rows(env)
    [request] = result.run_requests
    assert request.partition_key == "contoso"
    assert request.tags[TAG_OPERATION_RUN_ID] == str(row.id)
    assert request.tags[TAG_RUN_TYPE] == "backup_schedule.scheduled"
    assert request.tags[TAG_BACKUP_SCHEDULE] == "contoso-nightly"
    scheduled_for = when.astimezone(UTC).isoformat()
    assert request.run_key == f"backup_schedule__contoso_nightly:{scheduled_for}"
    assert row.context["scheduled_for"] == scheduled_for
    assert row.context["backup_schedule_key"] == "contoso-nightly"
    assert (row.status, row.trigger_source) == ("queued", "schedule")


def test_the_same_tick_evaluated_twice_gives_one_row_and_one_run(env):
    when = datetime(2026, 3, 1, 2, 0, tzinfo=BERLIN)
    first = _tick(env, when)
    # The same instant, as another timezone would present it, is the same tick.
    again = _tick(env, when.astimezone(UTC))
    assert len(first.run_requests) == 1
    assert again.run_requests == []
    assert f"#{_scheduled_rows(env)[0].id}" in again.skip_message
    assert len(_scheduled_rows(env)) == 1


def test_a_tick_evaluated_after_its_run_completed_still_requests_nothing(env):
    when = datetime(2026, 3, 1, 2, 0, tzinfo=BERLIN)
    _tick(env, when)
    [row] = _scheduled_rows(env)
    env["ledger"].complete(row.id, "succeeded")
    assert _tick(env, when).run_requests == []
    assert len(_scheduled_rows(env)) == 1


def test_concurrent_evaluations_of_one_tick_request_one_run(env):
    when = datetime(2026, 3, 1, 2, 0, tzinfo=BERLIN)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: _tick(env, when), range(8)))
    assert sum(len(r.run_requests) for r in results) == 1
    assert len(_scheduled_rows(env)) == 1


def test_consecutive_ticks_give_one_row_and_one_run_each(env):
    days = [datetime(2026, 3, d, 2, 0, tzinfo=BERLIN) for d in (1, 2, 3)]
    requests = [r for d in days for r in _tick(env, d).run_requests]
    rows = _scheduled_rows(env)
    assert len(requests) == len(rows) == 3
    assert {r.run_key for r in requests} == {
        f"backup_schedule__contoso_nightly:{d.astimezone(UTC).isoformat()}" for d in days
    }
    assert {r.tags[TAG_OPERATION_RUN_ID] for r in requests} == {str(r.id) for r in rows}


def test_each_schedule_has_its_own_tick_identity(env):
    when = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    nightly = _tick(env, when)
    weekly = _tick(env, when, "backup_schedule__contoso_weekly")
    assert len(nightly.run_requests) == len(weekly.run_requests) == 1
    assert {r.context["backup_schedule_key"] for r in _scheduled_rows(env)} == {
        "contoso-nightly",
        "contoso-weekly",
    }
