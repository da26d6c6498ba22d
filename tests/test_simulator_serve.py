"""The GraphClient works unchanged against any Graph-compatible server named by graph_base_url and
login_base_url: here `atlas-dagster simulator serve` in its own process, over real sockets."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from atlas_dagster.config import ProviderConnection, parse_config
from atlas_dagster.graph import GraphClient
from atlas_dagster.simulator import SimulatedTenant
from atlas_dagster.simulator.server import DEFAULT_SECRET as SIMULATED_SECRET
from graph_contracts import CONTRACTS, POLICY_CONTRACTS, content_hash
from tests.dagster_procs import free_port

PROFILE, SEED = "small", 5

BANNER = re.compile(r"at (?P<url>http://\S+) tenant_id=(?P<tenant>\S+) client_id=(?P<client>\S+)")
STARTUP_SECONDS = 30.0


@dataclass(frozen=True)
class Served:
    base_url: str
    tenant_id: str
    client_id: str


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The process's first stdout line, or a failure naming what it said instead."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0]:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"simulator serve printed no banner within {timeout:.0f} s; stderr: {err}")
    return line[0]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlas_dagster.cli",
            "simulator",
            "serve",
            "--port",
            str(free_port()),
            "--profile",
            PROFILE,
            "--seed",
            str(SEED),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = first_line(proc, STARTUP_SECONDS)
        match = BANNER.search(banner)
        assert match, f"unexpected banner: {banner!r}"
        yield Served(match["url"], match["tenant"], match["client"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def client(served: Served) -> Iterator[GraphClient]:
    config = parse_config(
        f"""\
database_url: sqlite:///unused.db
provider_connections:
  - key: served-sim
    display_name: Simulator over sockets
    tenant_id: {served.tenant_id}
    client_id: {served.client_id}
    client_secret: ${{SERVED_SIM_SECRET}}
    graph_base_url: {served.base_url}
    login_base_url: {served.base_url}
""",
        "atlas.yaml",
        {"SERVED_SIM_SECRET": SIMULATED_SECRET},
    )
    connection: ProviderConnection = config.connection("served-sim")
    graph = GraphClient(connection)
    try:
        yield graph
    finally:
        graph.close()


def test_the_banner_names_a_loopback_http_base_url(served: Served):
    assert served.base_url.startswith("http://127.0.0.1:")


def test_sign_in_over_sockets_yields_a_token_whose_roles_are_the_granted_permissions(client):
    claims = client.token_claims()
    assert claims["tid"] == client.connection.tenant_id
    assert {p for key in POLICY_CONTRACTS for p in CONTRACTS[key].permissions} <= set(
        claims["roles"]
    )


def test_every_policy_contract_reads_exactly_the_seeded_tenant(client):
    expected = SimulatedTenant.generate(PROFILE, SEED)
    for key in POLICY_CONTRACTS:
        contract = CONTRACTS[key]
        read = {o["id"]: content_hash(contract, o) for o in client.read_policies(key)}
        want = {o["id"]: content_hash(contract, o) for o in expected.policies(key)}
        assert want, f"the seeded tenant has no {key}: the comparison would prove nothing"
        assert read == want, key
    assert client.stats.pages >= len(POLICY_CONTRACTS)


def test_groups_delta_full_round_then_incremental_round_is_empty(client):
    expected = SimulatedTenant.generate(PROFILE, SEED)
    items: list[dict] = []
    delta_link = None
    for page in client.delta("groups_delta", None):
        items.extend(page.items)
        delta_link = page.delta_link or delta_link
    assert {g["id"] for g in items} == {g["id"] for g in expected.groups()}
    assert delta_link is not None and delta_link.startswith(client.connection.graph_base_url)

    again = list(client.delta("groups_delta", delta_link))
    assert [g for page in again for g in page.items + page.removed] == []
    assert again[-1].delta_link is not None
