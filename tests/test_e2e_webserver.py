"""End to end: ``dagster dev -w workspace.yaml`` shows the assets, their partitions, their checks
and the metadata of a materialisation run from the CLI, read through Dagster's GraphQL API
(issue 4). Loading the code location makes no Graph request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas_dagster.ledger.run_types import TAG_OPERATION_RUN_ID
from tests.conftest import write_config
from tests.dagster_procs import BIN, dagster_processes, free_port, graphql, process_env

pytestmark = pytest.mark.slow

TENANT_ASSETS = {"inventory", "directory_groups", "provider_connection_checks"}

ASSETS_QUERY = """
query {
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionKeys
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks {
          name
          blocking
          executionForLatestMaterialization { runId partition status }
        }
      }
    }
  }
}
"""

MATERIALIZATION_QUERY = """
query Latest($partition: String!) {
  assetOrError(assetKey: {path: ["inventory"]}) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId
        partition
        metadataEntries {
          label
          __typename
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on MarkdownMetadataEntry { mdStr }
          ... on JsonMetadataEntry { jsonString }
        }
      }
    }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status jobName tags { key value } }
  }
}
"""


@pytest.fixture
def sentinel() -> Iterator[socket.socket]:
    """A listening socket that no one should connect to: the Graph and login host of a
    configured connection. Any connection attempt waits in its backlog to be counted."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _was_contacted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def _metadata(entries: list[dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for e in entries:
        value = next(
            (e[k] for k in ("intValue", "floatValue", "mdStr", "jsonString") if k in e), None
        )
        values[e["label"]] = value
    return values


def test_dagster_dev_shows_assets_partitions_checks_and_cli_materialisation(
    tmp_path: Path, sentinel: socket.socket
) -> None:
    port = sentinel.getsockname()[1]
    config = write_config(tmp_path / "atlas.yaml", f"sqlite:///{tmp_path / 'atlas.db'}")
    config.write_text(
        config.read_text().replace(
            "backup_schedules:",
            f"""\
  - key: sentinel
    display_name: Nobody may call this tenant while definitions load
    tenant_id: 33333333-3333-4333-8333-333333333333
    client_id: 44444444-4444-4444-8444-444444444444
    client_secret: ${{E2E_CLIENT_SECRET}}
    graph_base_url: http://127.0.0.1:{port}
    login_base_url: http://127.0.0.1:{port}
backup_schedules:""",
        )
    )
    home = Path(os.environ["DAGSTER_HOME"])
    env = process_env(home, config, E2E_CLIENT_SECRET="e2e-not-a-real-secret")

    started = subprocess.run(
        [
            str(BIN / "atlas-dagster"),
            "start",
            "inventory.sync",
            "--connection",
            "contoso",
            "--in-process",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    row = json.loads(started.stdout)["operation_run"]
    assert (row["status"], row["outcome"]) == ("completed", "succeeded"), row

    web_port = free_port()
    with dagster_processes(env, tmp_path, tmp_path / "logs") as group:
        group.dev(web_port)

        def asset_nodes() -> dict[str, Any]:
            data = graphql(web_port, ASSETS_QUERY)["assetNodes"]
            return {"/".join(n["assetKey"]["path"]): n for n in data}

        # The partitions sensor (in the daemon `dagster dev` runs) adds the connection no run
        # has used yet, still without calling its Graph host.
        nodes = group.wait_until(
            "the sentinel connection's partition",
            lambda: (
                (found := asset_nodes())
                and "sentinel" in found["inventory"]["partitionKeys"]
                and found
            ),
            timeout=60,
        )
        assert set(nodes) >= TENANT_ASSETS
        for name in TENANT_ASSETS:
            assert nodes[name]["isPartitioned"], name
            assert "contoso" in nodes[name]["partitionKeys"], name

        inventory = nodes["inventory"]
        assert inventory["assetChecksOrError"]["__typename"] == "AssetChecks"
        checks = {c["name"]: c for c in inventory["assetChecksOrError"]["checks"]}
        assert {"mass_deletion", "non_empty"} <= set(checks)
        assert checks["mass_deletion"]["blocking"] is False  # a hold warns: the run goes on
        for name in ("mass_deletion", "non_empty"):
            execution = checks[name]["executionForLatestMaterialization"]
            assert execution is not None, name
            assert (execution["runId"], execution["status"]) == (
                row["dagster_run_id"],
                "SUCCEEDED",
            ), name

        asset = graphql(web_port, MATERIALIZATION_QUERY, {"partition": "contoso"})["assetOrError"]
        assert asset["__typename"] == "Asset"
        [materialisation] = asset["assetMaterializations"]
        assert materialisation["runId"] == row["dagster_run_id"]
        assert materialisation["partition"] == "contoso"
        metadata = _metadata(materialisation["metadataEntries"])
        assert metadata["operation_run_id"] == row["id"]
        assert metadata["items"] == row["summary_counts"]["items"] > 0
        assert metadata["created"] == metadata["items"], "a first sync creates every item"
        assert metadata["graph_requests"] > 0
        assert metadata["changes"].startswith("| contract | created |")

        run = graphql(web_port, RUN_QUERY, {"runId": row["dagster_run_id"]})["runOrError"]
        assert (run["status"], run["jobName"]) == ("SUCCESS", "inventory_sync_job")
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags[TAG_OPERATION_RUN_ID] == str(row["id"])
        assert tags["dagster/partition"] == "contoso"

        assert not _was_contacted(sentinel), "loading the code location called Graph"
