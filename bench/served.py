"""What the end-to-end benchmarks share: a simulated tenant served over loopback HTTP from the
benchmark's own process, a config that signs in to it as an ordinary (not simulated) connection,
and ``atlas-dagster`` commands run as subprocesses against it and timed.

Because the tenant lives in the benchmark's process, a benchmark can change it between commands
(as an admin would in the portal) and count what it was asked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SECRET_VAR = "ATLAS_BENCH_SIM_SECRET"

CONFIG = """\
database_url: {url}
provider_connections:
  - key: bench
    display_name: Simulated tenant over loopback
    tenant_id: {tenant_id}
    client_id: {client_id}
    client_secret: ${{{secret_var}}}
    graph_base_url: {base_url}
    login_base_url: {base_url}
backup_schedules:
  - key: bench-nightly
    provider_connection: bench
    cron: "0 2 * * *"
    policy_types: all
"""


def _cli() -> str:
    # The console script of the interpreter running this file (.venv/bin/python → .venv/bin).
    beside = Path(sys.executable).parent / "atlas-dagster"
    return str(beside) if beside.exists() else (shutil.which("atlas-dagster") or "atlas-dagster")


class Cli:
    """``atlas-dagster`` as a subprocess, with the benchmark's config and environment."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str], verbose: bool):
        self.config, self.workdir, self.env, self.verbose = config, workdir, env, verbose
        self.exe = _cli()

    def run(
        self,
        *argv: str,
        ok: tuple[int, ...] = (0,),
        answers: bool = True,
        until: str | None = None,
    ) -> tuple[dict[str, Any], float, float]:
        """The command's JSON answer, its wall time, and the time until the answer was printed
        — or, with ``until``, until a line starting with it was (the execute command prints its
        row's line before its follow-up sync)."""
        cmd = [self.exe, "--config", str(self.config), *(["-v"] if self.verbose else []), *argv]
        err_path = self.workdir / "stderr.txt"
        lines: list[str] = []
        answered = None
        with err_path.open("w+") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=self.env, cwd=self.workdir
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                # `--json` answers are indented: the object closes on a line of its own.
                done = line.startswith(until) if until else line.rstrip("\n") == "}"
                if answered is None and done:
                    answered = time.perf_counter() - started
            code = proc.wait()
            wall = time.perf_counter() - started
            err.seek(0)
            stderr = err.read()
        if self.verbose:
            print(f"[{wall:6.2f} s] atlas-dagster {' '.join(argv)} → {code}", file=sys.stderr)
            if stderr.strip():
                print(stderr.rstrip(), file=sys.stderr)
        if code not in ok:
            sys.exit(f"FAILED: atlas-dagster {' '.join(argv)} exited {code}: {stderr.strip()}")
        text = "".join(lines)
        if not answers:
            return {}, wall, answered if answered is not None else wall
        try:
            answer = json.JSONDecoder().raw_decode(text.lstrip())[0]
        except ValueError:
            sys.exit(f"FAILED: atlas-dagster {' '.join(argv)} printed no JSON: {text[:500]}")
        return answer, wall, answered if answered is not None else wall


def report(result: Any, failed: list[str]) -> None:
    """Print a benchmark's figures as JSON; exit 1 with a FAILED line when a goal was missed."""
    print(json.dumps(result, indent=2))
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def machine(tries: int = 3) -> dict[str, float]:
    """How fast this machine starts Python and imports Dagster (best of ``tries``): the fixed
    cost in every command's wall time, printed so numbers from different machines compare."""

    def best(code: str) -> float:
        times = []
        for _ in range(tries):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - started)
        return round(min(times), 2)

    return {"python_start_s": best("pass"), "import_dagster_s": best("import dagster")}


@contextmanager
def served(sim: Any, database_url: str, workdir: Path, verbose: bool = False) -> Iterator[Cli]:
    """``sim`` served on loopback while the block runs, and the commands to run against it."""
    tenant = sim.tenant
    with sim.serve("127.0.0.1", 0) as base_url:
        config = workdir / "atlas.yaml"
        config.write_text(
            CONFIG.format(
                url=database_url,
                tenant_id=tenant.tenant_id,
                client_id=tenant.client_id,
                secret_var=SECRET_VAR,
                base_url=base_url,
            )
        )
        env = {
            **os.environ,
            SECRET_VAR: sim.client_secret,
            "DAGSTER_HOME": str(workdir / "dagster"),
            # Unbuffered, so the moment a command prints a line is seen here.
            "PYTHONUNBUFFERED": "1",
        }
        (workdir / "dagster").mkdir()
        cli = Cli(config, workdir, env, verbose)
        yield cli
