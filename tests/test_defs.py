"""The code location loads, with the names people rely on, and without touching the network."""

import socket

import dagster as dg

from atlas_dagster.config import parse_config
from atlas_dagster.definitions import build_definitions

CONFIG = """\
provider_connections:
  - key: contoso
    tenant_id: 6f1c2d3e-0000-4000-8000-000000000001
    client_id: 1b2c3d4e-0000-4000-8000-000000000002
    client_secret: s
refresh_schedules:
  - key: hourly-groups
    job: directory_groups_sync_job
    cron: "15 * * * *"
    enabled: false
"""


def test_definitions_load_without_any_network_io(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("definitions loading opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    defs = build_definitions(parse_config(CONFIG, "atlas.yaml", {}))
    repo = defs.get_repository_def()
    assert {
        "inventory_sync_job",
        "directory_groups_sync_job",
        "provider_connection_verify_job",
    } <= set(repo.job_names)
    assert {
        "operation_runs_mirror_started",
        "operation_runs_mirror_success",
        "operation_runs_mirror_failure",
        "operation_runs_mirror_canceled",
        "operation_runs_reconciler",
        "provider_connection_partitions",
    } <= {s.name for s in repo.sensor_defs}
    schedule = repo.get_schedule_def("refresh__hourly_groups")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"inventory", "directory_groups", "provider_connection_checks"} <= keys


def test_shipped_definitions_object_loads():
    from atlas_dagster.definitions import defs

    assert isinstance(defs, dg.Definitions)
    defs.get_repository_def().load_all_definitions()
