"""A harness for end-to-end tests that run real Dagster processes (webserver, daemon, ``dagster
dev``) against a test's own ``DAGSTER_HOME`` and ``ATLAS_CONFIG``.

Every process starts in its own session, so the code servers and run workers it spawns share its
process group; teardown kills that group (and any descendant that left it). When the block of
:func:`dagster_processes` fails, each process's log is written to stderr, where pytest shows it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from atlas_dagster.db import sqlalchemy_url
from atlas_dagster.ledger.start import INSTANCE_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE = REPO_ROOT / "workspace.yaml"
LOCATION_NAME = "atlas_dagster"
BIN = Path(sys.executable).parent
LOG_TAIL_CHARS = 20_000

T = TypeVar("T")


class ProcessFailed(AssertionError):
    """A Dagster process exited, or a condition it should bring about never came."""


def free_port() -> int:
    """A loopback TCP port nothing listens on (also usable as an unreachable server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_instance(dagster_home: Path, postgres_url: str | None = None) -> Path:
    """``dagster.yaml`` in ``dagster_home``: the shipped instance config, plus dagster-postgres
    storage when ``postgres_url`` is given."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    if postgres_url is not None:
        # SQLAlchemy 2.1 maps a bare postgresql:// URL to psycopg 3, which is not installed.
        config["storage"] = {"postgres": {"postgres_url": sqlalchemy_url(postgres_url)}}
    target = dagster_home / "dagster.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def graphql(port: int, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One GraphQL request to the webserver on ``port``; its ``data``, or an error naming why."""
    response = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": dict(variables or {})},
        timeout=30,
    )
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise ProcessFailed(f"GraphQL errors: {body['errors']}")
    return body["data"]


LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""

DAEMON_QUERY = """
query { instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }
"""


@dataclass
class DagsterProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ProcessFailed(
                f"{self.name} exited with code {code}:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
            )


@dataclass
class ProcessGroup:
    """The Dagster processes of one test, sharing its environment and working directory."""

    env: dict[str, str]
    cwd: Path
    log_dir: Path
    processes: list[DagsterProcess] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> DagsterProcess:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = DagsterProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def wait_until(
        self,
        what: str,
        probe: Callable[[], T | None],
        timeout: float,
        interval: float = 0.5,
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail early if a process died."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            for proc in self.processes:
                proc.check_alive()
            try:
                value = probe()
                if value:
                    return value
            except (httpx.HTTPError, ProcessFailed) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error})" if last_error else ""
                raise ProcessFailed(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
            time.sleep(interval)

    def webserver(self, port: int, timeout: float = 90) -> DagsterProcess:
        proc = self.start(
            "webserver",
            [
                str(BIN / "dagster-webserver"),
                "-w",
                str(WORKSPACE),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
        )
        self.wait_for_location(port, timeout)
        return proc

    def daemon(self) -> DagsterProcess:
        return self.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)])

    def dev(self, port: int, timeout: float = 90) -> DagsterProcess:
        proc = self.start(
            "dagster-dev",
            [str(BIN / "dagster"), "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)],
        )
        self.wait_for_location(port, timeout)
        return proc

    def wait_for_location(self, port: int, timeout: float) -> None:
        """Until the webserver answers and has loaded the code location (its load error, if it
        has one, fails the test with Dagster's message)."""

        def loaded() -> bool:
            data = graphql(port, LOCATION_QUERY)["workspaceOrError"]
            entries = {e["name"]: e for e in data.get("locationEntries") or []}
            entry = entries.get(LOCATION_NAME)
            if entry is None or entry["loadStatus"] != "LOADED":
                return False
            location = entry["locationOrLoadError"] or {}
            if location.get("__typename") == "PythonError":
                raise AssertionError(f"code location failed to load: {location['message']}")
            return True

        self.wait_until(f"code location {LOCATION_NAME} on port {port}", loaded, timeout)

    def wait_for_daemons(self, port: int, daemon_types: set[str], timeout: float = 90) -> None:
        """Until the named daemons report healthy heartbeats (read through the webserver)."""

        def healthy() -> bool:
            statuses = graphql(port, DAEMON_QUERY)["instance"]["daemonHealth"]
            ok = {s["daemonType"] for s in statuses["allDaemonStatuses"] if s["healthy"]}
            return daemon_types <= ok

        self.wait_until(f"healthy daemons {sorted(daemon_types)}", healthy, timeout)

    def dump_logs(self) -> None:
        for proc in self.processes:
            sys.stderr.write(
                f"\n===== {proc.name} (exit code {proc.popen.poll()}) =====\n"
                f"{proc.log_text()[-LOG_TAIL_CHARS:]}\n"
            )

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            _kill_tree(proc.popen)


def _kill_tree(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever of it (or its descendants) remains."""
    try:
        descendants = psutil.Process(popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)
        for child in descendants:
            with suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        _, alive = psutil.wait_procs(descendants, timeout=grace)
        if not alive:
            return


def process_env(dagster_home: Path, atlas_config: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(dagster_home),
        ATLAS_CONFIG=str(atlas_config),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@contextmanager
def dagster_processes(env: dict[str, str], cwd: Path, log_dir: Path) -> Iterator[ProcessGroup]:
    """Processes started through the yielded group live as long as the block; if the block
    fails, their logs go to stderr first."""
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(env=env, cwd=cwd, log_dir=log_dir)
    try:
        yield group
    except BaseException:
        group.dump_logs()
        raise
    finally:
        group.stop_all()
