"""Graph is reached only through the GraphClient, and only for calls in the contract registry."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from atlas_dagster.config import ProviderConnection, Secret
from atlas_dagster.graph import GraphClient, TokenBucket, path_pattern
from graph_contracts import CONTRACTS, POLICY_CONTRACTS

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PACKAGE = "atlas_dagster/graph/"
NETWORK_IMPORTS = {"httpx", "msal"}
GRAPH_HOST = re.compile(r"graph\.microsoft\.com", re.IGNORECASE)
# Fragments of Graph request paths: version roots, the resource roots the contracts read, $batch.
GRAPH_PATH = re.compile(
    r"/(?:v1\.0|beta)/|/deviceManagement\b|/deviceAppManagement\b|/identity/conditionalAccess"
    r"|/groups/delta|/\$batch"
)


def guarded_files() -> list[Path]:
    files = sorted((ROOT / "atlas_dagster").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return [*files, ROOT / "graph_contracts.py"]


def exempt(rel: str) -> bool:
    return rel.startswith((CLIENT_PACKAGE, "atlas_dagster/simulator/"))


PATTERNS = {key: path_pattern(c) for key, c in CONTRACTS.items()}


def matching_contracts(version_path: str) -> list[str]:
    """Contract keys whose template matches ``/{version}/path`` (query ignored)."""
    version, _, rest = version_path.lstrip("/").partition("/")
    return [
        key
        for key, c in CONTRACTS.items()
        if c.api_version == version and PATTERNS[key].match("/" + rest)
    ]


def docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def violations(rel: str, source: str) -> list[str]:
    """What in one module bypasses the GraphClient: an httpx/msal import, a Graph host, or a
    Graph path in code (docstrings and comments may mention them)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [f"imports {n}" for n in names if n.split(".")[0] in NETWORK_IMPORTS]
    docstrings = docstring_nodes(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in docstrings:
            continue
        text = node.value
        # config.py holds the default graph_base_url; the registry holds the contract paths.
        if GRAPH_HOST.search(text) and rel != "atlas_dagster/config.py":
            found.append(f"line {node.lineno}: Graph host {text!r}")
        if GRAPH_PATH.search(text) and rel != "graph_contracts.py":
            found.append(f"line {node.lineno}: Graph path {text!r}")
    return found


def test_only_the_graph_client_talks_to_graph():
    problems = {}
    for path in guarded_files():
        rel = path.relative_to(ROOT).as_posix()
        if exempt(rel):
            continue
        found = violations(rel, path.read_text(encoding="utf-8"))
        if found:
            problems[rel] = found
    assert problems == {}


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("import httpx\n", "imports httpx"),
        ("from msal import ConfidentialClientApplication\n", "imports msal"),
        ("URL = 'https://graph.microsoft.com/v1.0/groups'\n", "Graph host"),
        ("path = f'/deviceManagement/{kind}'\n", "Graph path"),
        ("BATCH = '/$batch'\n", "Graph path"),
    ],
)
def test_the_guard_catches_each_kind_of_bypass(source, problem):
    assert any(problem in v for v in violations("atlas_dagster/assets/x.py", source))


def test_the_guard_allows_docstrings_and_the_config_default():
    doc = '"""Reads /deviceManagement/intents through the client."""\n'
    assert violations("atlas_dagster/assets/x.py", doc) == []
    default = "DEFAULT_GRAPH_BASE_URL = 'https://graph.microsoft.com'\n"
    assert violations("atlas_dagster/config.py", default) == []


def test_the_graph_package_does_not_import_the_simulator():
    imports = []
    for path in sorted((ROOT / CLIENT_PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imports += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imports.append(node.module)
    assert "atlas_dagster.graph.client" in imports
    assert not [name for name in imports if name.startswith("atlas_dagster.simulator")]


def test_importing_the_client_changes_no_logging_and_loads_no_simulator():
    probe = (
        "import logging, sys\n"
        "import atlas_dagster.resources.graph\n"
        "assert not logging.getLogger('httpx').filters\n"
        "assert not [m for m in sys.modules if m.startswith('atlas_dagster.simulator')]\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_contract_path_is_matched_by_its_own_template():
    for key, contract in CONTRACTS.items():
        path = contract.path.replace("{id}", "00000000-0000-0000-0000-000000000001")
        assert key in matching_contracts(f"/{contract.api_version}{path}")
    assert matching_contracts("/v1.0/applications") == []
    assert matching_contracts("/beta/deviceManagement/configurationPolicies/x/y") == []


# --- Against the simulator ----------------------------------------------------------------


class Recorder(httpx.BaseTransport):
    """Wraps a transport and keeps every request it forwards."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.inner.handle_request(request)


def test_a_full_read_of_the_simulator_sends_only_contract_requests():
    simulator = pytest.importorskip("atlas_dagster.simulator")
    if not hasattr(simulator, "GraphSimulator"):
        pytest.skip("the Graph simulator is not in this tree yet")
    tenant = simulator.SimulatedTenant.generate("small", 3)
    sim = simulator.GraphSimulator(tenant, client_secret="guard-secret")
    recorder = Recorder(sim.transport())
    connection = ProviderConnection(
        key="guard-sim",
        display_name="Guard",
        tenant_id=tenant.tenant_id,
        client_id=tenant.client_id,
        client_secret=Secret("guard-secret"),
    )
    client = GraphClient(connection, transport=recorder, sleep=lambda s: None, bucket=TokenBucket())
    for key in POLICY_CONTRACTS:
        assert isinstance(list(client.read_policies(key)), list)
    pages = list(client.delta("groups_delta", None))
    assert pages[-1].delta_link is not None

    graph_paths = []
    for request in recorder.requests:
        if request.url.host != "graph.microsoft.com":
            continue
        graph_paths.append(request.url.path)
        if request.url.path.endswith("/$batch"):
            version = request.url.path.split("/")[1]
            for sub in json.loads(request.content)["requests"]:
                graph_paths.append(f"/{version}{sub['url'].split('?', 1)[0]}")
    assert graph_paths
    unmatched = [p for p in graph_paths if not matching_contracts(p)]
    assert unmatched == []
