"""Liveness of operation runs: where each run's work executes, its heartbeat, and when it is dead.

Whatever executes a run's work — the CLI for an in-process start, a Dagster run worker — records
itself on the ledger row (host, boot, pid and the pid's start time) with a fencing token, and
beats every ``HEARTBEAT_INTERVAL`` while it holds the row. A row is dead when its process is gone
from this host (or the host rebooted), or — for work on another machine, where the heartbeat is
the only sign — when no heartbeat came for ``STALE_AFTER``. Dead rows complete
``failed``/``run_crashed`` (:func:`atlas_dagster.mirror.reap`) and their identity is free again;
the fence keeps any survivor from writing after that.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import psutil

log = logging.getLogger("atlas_dagster.liveness")

HEARTBEAT_INTERVAL = 10.0
# Several missed heartbeats, and within the 60 s the ledger promises.
STALE_AFTER = timedelta(seconds=45)
# psutil derives a start time from boot time and ticks: equal within rounding for one process.
_START_TIME_TOLERANCE = 1.0


@dataclass(frozen=True)
class Executor:
    host: str
    boot_id: str
    pid: int
    process_started: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Executor | None:
        try:
            return cls(
                str(data["host"]),
                str(data.get("boot_id") or ""),
                int(data["pid"]),
                float(data["process_started"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def here() -> Executor:
    """This process, as a ledger row records it (computed per call: a forked worker differs)."""
    pid = os.getpid()
    return Executor(socket.gethostname(), _boot_id(), pid, psutil.Process(pid).create_time())


def process_alive(pid: int, started: float) -> bool:
    """Whether ``pid`` still runs and is the same process (pids are reused)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) <= _START_TIME_TOLERANCE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. access denied: it exists, we just may not look
        return True


def dead_reason(
    executor: dict[str, Any] | None,
    heartbeat_at: datetime | None,
    now: datetime,
    *,
    local: Executor | None = None,
) -> str | None:
    """Why the work recorded on an active row is dead, or None while it may be alive.

    A row with no executor is not judged here (its work has not been claimed; the mirror judges
    it by its Dagster run)."""
    if not executor:
        return None
    ex = Executor.from_dict(executor)
    if ex is None:
        return "its executor record is unreadable"
    local = local or here()
    if ex.host == local.host and ex.boot_id and local.boot_id:
        if ex.boot_id != local.boot_id:
            return f"{ex.host} restarted since {ex.describe()} took the run"
        # On its own host the process table is the truth: a live process keeps its row even
        # when a long write transaction (which holds the row) delays its heartbeat.
        return None if process_alive(ex.pid, ex.process_started) else f"its {ex.describe()} is gone"
    return stale_reason(heartbeat_at, now, f"its {ex.describe()}")


def stale_reason(heartbeat_at: datetime | None, now: datetime, who: str) -> str | None:
    """Why ``who`` counts as dead by its last sign of life, or None while that is recent."""
    if heartbeat_at is not None and now - heartbeat_at <= STALE_AFTER:
        return None
    age = "ever" if heartbeat_at is None else f"{int((now - heartbeat_at).total_seconds())} s"
    return f"no heartbeat from {who} for {age} (the bound is {int(STALE_AFTER.total_seconds())} s)"


class Heartbeat:
    """Beats a row's heartbeat from a daemon thread until stopped, or until the row is lost."""

    def __init__(self, beat, interval: float = HEARTBEAT_INTERVAL):
        # ``beat()`` returns False once the row no longer belongs to this execution.
        self._beat = beat
        self._interval = interval
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atlas-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._beat():
                    self.lost.set()
                    return
            except Exception:  # a database blip: the next beat may get through
                log.warning("heartbeat failed; retrying", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
