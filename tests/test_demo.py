"""`atlas-dagster demo` on the embedded default: every operation, then a summary."""

import os
import re
import subprocess
import sys

import sqlalchemy as sa


def test_demo_runs_every_operation_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_CONFIG", "DAGSTER_HOME")}
    done = subprocess.run(
        [sys.executable, "-m", "atlas_dagster.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"\[(\d)/(\d)\] (.+?) … (\w+)", done.stdout)
    assert [s[3] for s in steps] == ["succeeded"] * 5
    assert {"verify contoso-demo", "sync groups of contoso-demo"} <= {s[2] for s in steps}
    assert "Rows per table:" in done.stdout and "Where to look next:" in done.stdout
    assert (tmp_path / ".atlas" / "dagster" / "dagster.yaml").exists()
    engine = sa.create_engine(f"sqlite:///{tmp_path / '.atlas' / 'atlas.db'}")
    with engine.connect() as conn:
        outcomes = conn.exec_driver_sql(
            "SELECT type, status, outcome FROM operation_runs"
        ).fetchall()
        assert sorted(outcomes) == sorted(
            [
                ("provider_connection.verify", "completed", "succeeded"),
                ("directory_groups.sync", "completed", "succeeded"),
                ("inventory.sync", "completed", "succeeded"),
                ("backup_schedule.run_now", "completed", "succeeded"),
                ("restore.plan", "completed", "succeeded"),
            ]
        )
        assert conn.exec_driver_sql("SELECT count(*) FROM v_assignments_readable").scalar() > 0
        # Nothing changed since the backup: the plan has nothing to do.
        actions = conn.exec_driver_sql("SELECT DISTINCT action FROM restore_items").fetchall()
        assert actions == [("unchanged",)]
        [plan_id] = conn.exec_driver_sql("SELECT id FROM restore_plans").scalars().all()
    assert f"atlas-dagster restore show {plan_id} " in done.stdout
    engine.dispose()
