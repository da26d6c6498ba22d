"""A known client secret never reaches the database, a log line, a run tag or run metadata."""

import logging
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from atlas_dagster import schema
from atlas_dagster.config import load_config
from atlas_dagster.db import ready_engine
from atlas_dagster.definitions import build_definitions
from atlas_dagster.ledger.start import start_operation
from atlas_dagster.simulator import GraphSimulator, SimulatedTenant

SECRET = "Zq8~known-SECRET-value.4471"


def _config_text(database_url: str, base_url: str, tenant: SimulatedTenant, secret_var: str) -> str:
    return f"""\
database_url: {database_url}
provider_connections:
  - key: contoso
    tenant_id: {tenant.tenant_id}
    client_id: {tenant.client_id}
    client_secret: ${{{secret_var}}}
    graph_base_url: {base_url}
    login_base_url: {base_url}
"""


def _everything_in(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_secret_is_nowhere(tmp_path, monkeypatch, caplog, capfd, sqlite_url):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CONTOSO_SECRET", SECRET)
    monkeypatch.setenv("WRONG_SECRET", SECRET + "-wrong")
    tenant = SimulatedTenant.generate("small", 11)
    sim = GraphSimulator(tenant, client_secret=SECRET)
    home = Path(tmp_path / "dagster_home")
    with sim.serve() as base_url:
        cfg = tmp_path / "atlas.yaml"
        cfg.write_text(_config_text(sqlite_url, base_url, tenant, "CONTOSO_SECRET"))
        monkeypatch.setenv("ATLAS_CONFIG", str(cfg))
        config = load_config()
        defs = build_definitions(config)
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            rows = [
                start_operation(
                    config, t, defs=defs, connection="contoso", in_process=True, instance=instance
                ).row
                for t in ("provider_connection.verify", "directory_groups.sync", "inventory.sync")
            ]
            assert [r.outcome for r in rows] == ["succeeded", "succeeded", "succeeded"]
            # A wrong secret fails sign-in; its error message must not echo what was sent either.
            cfg.write_text(_config_text(sqlite_url, base_url, tenant, "WRONG_SECRET"))
            bad_config = load_config()
            bad = start_operation(
                bad_config,
                "provider_connection.verify",
                defs=build_definitions(bad_config),
                connection="contoso",
                in_process=True,
                instance=instance,
            ).row
            assert bad.outcome == "failed"
            assert bad.failure_summary[0]["reason_code"] == "provider_auth_failed"

            runs = instance.get_runs()
            assert len(runs) == 4
            for run in runs:
                assert SECRET not in repr(run.tags)
                records = instance.get_records_for_run(run.run_id, limit=10_000).records
                assert records
                for record in records:
                    assert SECRET not in repr(record.event_log_entry)
    engine = ready_engine(config)
    with engine.connect() as conn:
        for name in schema.CACHED_TABLES:
            for row in conn.execute(sa.select(schema.metadata.tables[name])):
                assert SECRET not in repr(tuple(row)), name
    engine.dispose()
    assert SECRET.encode() not in Path(sqlite_url.removeprefix("sqlite:///")).read_bytes()
    assert SECRET.encode() not in _everything_in(home)
    assert SECRET not in caplog.text
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err


def test_config_errors_never_show_the_secret(tmp_path):
    from atlas_dagster.config import ConfigError, parse_config

    text = "provider_connections:\n  - key: c\n    tenant_id: not a tenant\n    client_id: x\n    client_secret: ${S}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "atlas.yaml", {"S": SECRET})
    assert SECRET not in str(err.value)
