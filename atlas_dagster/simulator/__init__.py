"""The Microsoft Graph simulator: a deterministic tenant behind real Graph and Entra
sign-in shapes, with a process-level registry of one simulator per connection key."""

from __future__ import annotations

import threading

from atlas_dagster.simulator.faults import FaultPlan
from atlas_dagster.simulator.server import (
    GraphSimulator,
    SimulatorStats,
    minimum_request_units,
    serve_forever,
)
from atlas_dagster.simulator.tenant import PROFILES, SimulatedTenant

_registry: dict[str, GraphSimulator] = {}
_registry_lock = threading.Lock()


def simulator_for(key: str, profile: str = "small", seed: int = 1) -> GraphSimulator:
    """The process's simulator for a connection key, created on first use."""
    with _registry_lock:
        sim = _registry.get(key)
        if sim is None:
            sim = _registry[key] = GraphSimulator(SimulatedTenant.generate(profile, seed))
        return sim


def install_simulator(key: str, simulator: GraphSimulator) -> None:
    """Serve a connection key with this simulator from now on (tests bring their own)."""
    with _registry_lock:
        _registry[key] = simulator


def uninstall_simulator(key: str) -> None:
    with _registry_lock:
        _registry.pop(key, None)


__all__ = [
    "PROFILES",
    "FaultPlan",
    "GraphSimulator",
    "SimulatedTenant",
    "SimulatorStats",
    "install_simulator",
    "minimum_request_units",
    "serve_forever",
    "simulator_for",
    "uninstall_simulator",
]
