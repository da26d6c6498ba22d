"""Config loading: expansion, the demo default, and one-line errors that change nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from atlas_dagster.config import (
    ConfigError,
    ProviderConnection,
    Simulated,
    load_config,
    parse_config,
)
from tests.conftest import write_config

GOOD_CONNECTION = """\
  - key: contoso
    display_name: Contoso Ltd
    tenant_id: 6f1c2d3e-0000-4000-8000-000000000001
    client_id: 1b2c3d4e-0000-4000-8000-000000000002
    client_secret: ${CONTOSO_SECRET}
"""


def _cfg(connections: str = GOOD_CONNECTION, schedules: str = "", top: str = "") -> str:
    text = f"{top}provider_connections:\n{connections}"
    if schedules:
        text += f"backup_schedules:\n{schedules}"
    return text


SCHEDULE = """\
  - key: nightly
    provider_connection: contoso
    cron: "0 2 * * *"
    timezone: Europe/Berlin
"""


def test_demo_config_applies_without_a_file(monkeypatch, tmp_path):
    config = load_config()
    assert config.source == "<built-in demo config>"
    assert [c.key for c in config.provider_connections] == ["contoso-demo"]
    assert config.provider_connections[0].simulated is not None
    assert [(s.key, s.enabled) for s in config.backup_schedules] == [("contoso-demo-nightly", True)]
    assert config.database_url == f"sqlite:///{tmp_path / '.atlas' / 'atlas.db'}"


def test_atlas_config_env_wins_over_local_file(monkeypatch, tmp_path):
    (tmp_path / "atlas.yaml").write_text("provider_connections: []\n")
    other = tmp_path / "other.yaml"
    other.write_text(_cfg(), encoding="utf-8")
    monkeypatch.setenv("ATLAS_CONFIG", str(other))
    monkeypatch.setenv("CONTOSO_SECRET", "s3cr3t")
    assert [c.key for c in load_config().provider_connections] == ["contoso"]
    monkeypatch.delenv("ATLAS_CONFIG")
    assert load_config().provider_connections == ()


def test_variables_and_defaults_are_expanded_and_secrets_masked():
    config = parse_config(
        _cfg(top="database_url: ${DB_URL:-sqlite:////tmp/x.db}\n"),
        "atlas.yaml",
        {"CONTOSO_SECRET": "p@ss: {not yaml}"},
    )
    assert config.database_url == "sqlite:////tmp/x.db"
    secret = config.provider_connections[0].client_secret
    assert isinstance(secret, SecretStr) and secret.get_secret_value() == "p@ss: {not yaml}"
    assert "p@ss" not in repr(config) and "p@ss" not in str(secret)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        pytest.param(
            _cfg(GOOD_CONNECTION + "    colour: blue\n"),
            {"CONTOSO_SECRET": "x"},
            "provider_connections[contoso].colour: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            _cfg(GOOD_CONNECTION + GOOD_CONNECTION),
            {"CONTOSO_SECRET": "x"},
            "provider_connections[contoso].key: duplicate key 'contoso'",
            id="duplicate-key",
        ),
        pytest.param(
            _cfg(schedules=SCHEDULE.replace("0 2 * * *", "0 25 * * *")),
            {"CONTOSO_SECRET": "x"},
            "backup_schedules[nightly].cron: not a valid cron expression",
            id="bad-cron",
        ),
        pytest.param(
            _cfg(schedules=SCHEDULE.replace("Europe/Berlin", "Mars/Olympus")),
            {"CONTOSO_SECRET": "x"},
            "backup_schedules[nightly].timezone: unknown timezone 'Mars/Olympus'",
            id="bad-timezone",
        ),
        pytest.param(
            _cfg(
                schedules=SCHEDULE.replace(
                    "provider_connection: contoso", "provider_connection: nope"
                )
            ),
            {"CONTOSO_SECRET": "x"},
            "backup_schedules[nightly].provider_connection: no provider connection with key 'nope'",
            id="missing-connection",
        ),
        pytest.param(
            _cfg(),
            {},
            "provider_connections[contoso].client_secret: environment variable CONTOSO_SECRET is not set",
            id="missing-secret-variable",
        ),
        pytest.param(
            _cfg(schedules=SCHEDULE + "    policy_types: [device_configurations, warp_drives]\n"),
            {"CONTOSO_SECRET": "x"},
            "backup_schedules[nightly].policy_types: unknown contract 'warp_drives'",
            id="unknown-contract",
        ),
        pytest.param(
            _cfg(GOOD_CONNECTION + "    graph_base_url: http://graph.example.com\n"),
            {"CONTOSO_SECRET": "x"},
            "provider_connections[contoso].graph_base_url: plain http:// is accepted only for loopback",
            id="http-non-loopback",
        ),
        pytest.param(
            "provider_connections: [\n",
            {},
            "not valid YAML",
            id="broken-yaml",
        ),
        pytest.param(
            # The second block would silently replace the first.
            _cfg() + "provider_connections:\n  - key: fabrikam\n    simulated: {seed: 2}\n",
            {"CONTOSO_SECRET": "x"},
            "provider_connections: duplicate key at line 7 (first given at line 1)",
            id="duplicate-top-level-block",
        ),
        pytest.param(
            _cfg(GOOD_CONNECTION + "    display_name: Contoso Again\n"),
            {"CONTOSO_SECRET": "x"},
            "provider_connections[contoso].display_name: duplicate key at line 7 "
            "(first given at line 3)",
            id="duplicate-field-in-an-entry",
        ),
        pytest.param(
            "provider_connections:\n  - key: sim\n    simulated: {profile: small, profile: large}\n",
            {},
            "provider_connections[sim].simulated.profile: duplicate key at line 3 "
            "(first given at line 3)",
            id="duplicate-key-in-a-nested-mapping",
        ),
        pytest.param(
            _cfg(
                schedules=SCHEDULE
                + SCHEDULE.replace("nightly", "weekly")
                + "    cron: '0 3 * * 0'\n"
            ),
            {"CONTOSO_SECRET": "x"},
            "backup_schedules[weekly].cron: duplicate key at line 16 (first given at line 14)",
            id="duplicate-field-in-a-later-entry",
        ),
        pytest.param("", {}, "line 1: the file holds no settings", id="empty-file"),
        pytest.param(
            "# atlas config, to do\n\n",
            {},
            "line 1: the file holds no settings",
            id="comments-only",
        ),
    ],
)
def test_invalid_config_is_one_line_naming_file_entry_and_field(text, env, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "/etc/atlas/atlas.yaml", env)
    message = str(err.value)
    assert message.startswith("/etc/atlas/atlas.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_an_empty_config_file_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "atlas.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"^{empty}: line 1: the file holds no settings"):
        load_config(empty, env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            _cfg(schedules=SCHEDULE.replace("0 2 * * *", "0 25 * * *")),
            "line 10: backup_schedules[nightly].cron: not a valid cron expression",
            id="the-value",
        ),
        pytest.param(
            _cfg(GOOD_CONNECTION + "    colour: blue\n"),
            "line 7: provider_connections[contoso].colour: unknown key",
            id="the-unknown-key",
        ),
        pytest.param(
            _cfg(GOOD_CONNECTION.replace("${CONTOSO_SECRET}", "${UNSET_SECRET}")),
            "line 6: provider_connections[contoso].client_secret: environment variable",
            id="the-variable",
        ),
        pytest.param(
            _cfg(
                GOOD_CONNECTION.replace("    client_id: 1b2c3d4e-0000-4000-8000-000000000002\n", "")
            ),
            "line 2: provider_connections[contoso].client_id: is required",
            id="the-entry-missing-a-field",
        ),
        pytest.param(
            _cfg(schedules=SCHEDULE + SCHEDULE.replace("contoso", "nope").replace("nightly", "b")),
            "line 13: backup_schedules[b].provider_connection: no provider connection",
            id="the-reference",
        ),
    ],
)
def test_an_error_gives_the_line_of_what_it_names(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "atlas.yaml", {"CONTOSO_SECRET": "x"})
    assert str(err.value).startswith(f"atlas.yaml: {expected}")


def test_settings_built_in_code_are_checked_frozen_and_hashable():
    conn = ProviderConnection(key="sim", simulated=Simulated(seed=3))
    assert conn.display_name == "sim" and conn.simulated == Simulated(profile="small", seed=3)
    for bad in ({"colour": "blue"}, {"key": "Not A Slug"}, {"simulated": None}):
        with pytest.raises(ValidationError):
            ProviderConnection(**{"key": "sim", "simulated": Simulated(), **bad})
    with pytest.raises(ValidationError):
        conn.key = "other"  # type: ignore[misc]
    text = _cfg(schedules=SCHEDULE)
    first, again = (parse_config(text, "a.yaml", {"CONTOSO_SECRET": "x"}) for _ in range(2))
    assert first == again and len({first, again}) == 1
    assert first != parse_config(text, "a.yaml", {"CONTOSO_SECRET": "y"})


def test_keys_a_yaml_merge_overrides_are_not_duplicates():
    text = (
        "provider_connections:\n"
        "  - key: a\n    simulated: &sim {profile: small, seed: 1}\n"
        "  - key: b\n    simulated: {<<: *sim, seed: 2}\n"
    )
    sims = [c.simulated for c in parse_config(text, "a.yaml", {}).provider_connections]
    assert [(s.profile, s.seed) for s in sims] == [("small", 1), ("small", 2)]


def test_loopback_http_is_accepted_for_simulators():
    text = _cfg(
        GOOD_CONNECTION
        + "    graph_base_url: http://127.0.0.1:8765\n    login_base_url: http://localhost:8765/\n"
    )
    conn = parse_config(text, "a.yaml", {"CONTOSO_SECRET": "x"}).provider_connections[0]
    assert (conn.graph_base_url, conn.login_base_url) == (
        "http://127.0.0.1:8765",
        "http://localhost:8765",
    )


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "atlas_dagster.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_invalid_config_changes_no_database(tmp_path, sqlite_url):
    import sqlalchemy as sa

    cfg = write_config(tmp_path / "atlas.yaml", sqlite_url)
    ok = _cli("db", "upgrade", cwd=tmp_path, env={"ATLAS_CONFIG": str(cfg)})
    assert ok.returncode == 0, ok.stderr
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        before = conn.exec_driver_sql("SELECT key, cron FROM backup_schedules").fetchall()
    broken = cfg.read_text().replace('cron: "0 2 * * *"', 'cron: "61 * * * *"')
    broken += "  - key: second\n    provider_connection: contoso\n    cron: '0 3 * * *'\n"
    cfg.write_text(broken)
    bad = _cli("db", "upgrade", cwd=tmp_path, env={"ATLAS_CONFIG": str(cfg)})
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "backup_schedules[contoso-nightly].cron" in bad.stderr
    with engine.connect() as conn:
        after = conn.exec_driver_sql("SELECT key, cron FROM backup_schedules").fetchall()
    assert after == before
    engine.dispose()


CRON_SAMPLES = [
    "0 2 * * *",
    "*/15 * * * *",
    "0,30 8-18 * * 1-5",
    "0 0 1-5 * MON-FRI",
    "0 0 * JAN,FEB *",
    "5/10 * * * *",
    "0-59/5 * * * *",
    "0 0 * * 7",
    "0 0 * * sun",
    "0 0 29 2 *",
    "0 0 30,31 2 *",
    "@daily",
    "@hourly",
    "61 * * * *",
    "0 24 * * *",
    "0 0 0 * *",
    "0 0 * 13 *",
    "0 0 * * 8",
    "*/0 * * * *",
    "0 0 30 2 *",
    "0 0 31 2 *",
    "* * *",
    "* * * * * *",
    "a b c d e",
    "",
]


@pytest.mark.parametrize("expression", CRON_SAMPLES)
def test_the_cron_check_is_dagsters_without_importing_dagster(expression):
    import warnings

    import dagster as dg

    from atlas_dagster.config import _cron

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg.ScheduleDefinition(name="x", cron_schedule=expression, job_name="x")
        dagster_accepts = True
    except dg.DagsterInvalidDefinitionError:
        dagster_accepts = False
    try:
        _cron(expression)
        we_accept = True
    except Exception:
        we_accept = False
    assert we_accept == dagster_accepts


def test_loading_a_config_imports_no_dagster():
    import subprocess
    import sys

    code = (
        "import sys; from atlas_dagster.config import load_config; load_config(); "
        "assert 'dagster' not in sys.modules, 'dagster imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
