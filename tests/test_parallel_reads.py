"""Policy reads side by side (issue 14): a sync or backup reads its types at the same time, never
with more requests in flight than the client's concurrency, every one paced by the tenant's token
bucket, and for exactly the request units of a read that sends one request after another."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from atlas_dagster import db, schema
from atlas_dagster.assets.backups import plan_backup, run_backup
from atlas_dagster.assets.inventory import run_inventory_sync
from atlas_dagster.config import ProviderConnection, Secret, load_config
from atlas_dagster.graph import GraphClient, TokenBucket
from atlas_dagster.reasons import PROVIDER_AUTH_FAILED, GraphError
from atlas_dagster.simulator import GraphSimulator
from atlas_dagster.stores import backups as store
from graph_contracts import POLICY_CONTRACTS
from tests.conftest import write_config

GRAPH_HOST = "graph.microsoft.com"
# How long a held request waits for the others before the gate gives up (only a client that
# sends one request at a time ever waits that long).
PATIENCE_S = 30.0
_keys = itertools.count()


class Gate(httpx.BaseTransport):
    """The simulator's transport, counting the Graph requests in flight (sign-in aside). Each
    request is held until ``together`` of them are in flight at once; a client that never gets
    there opens the gate only by running out of patience, which ``timed_out`` records."""

    def __init__(self, inner: httpx.BaseTransport, together: int):
        self.inner = inner
        self.together = together
        self.in_flight = 0
        self.peak = 0
        self.timed_out = False
        self._open = threading.Event()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != GRAPH_HOST:
            return self.inner.handle_request(request)
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.in_flight >= self.together:
                self._open.set()
        try:
            if not self._open.wait(PATIENCE_S):
                self.timed_out = True
                self._open.set()
            return self.inner.handle_request(request)
        finally:
            with self._lock:
                self.in_flight -= 1


def sim_client(
    sim: GraphSimulator,
    *,
    concurrency: int,
    transport: httpx.BaseTransport | None = None,
    secret: str | None = None,
    bucket: TokenBucket | None = None,
    sleep=lambda seconds: None,
) -> GraphClient:
    """A client of its own (own sign-in, own bucket) reading the simulated tenant."""
    connection = ProviderConnection(
        key=f"parallel-{next(_keys)}",
        display_name="Parallel",
        tenant_id=sim.tenant.tenant_id,
        client_id=sim.tenant.client_id,
        client_secret=Secret(secret or sim.client_secret),
    )
    return GraphClient(
        connection,
        transport=transport or sim.transport(),
        sleep=sleep,
        bucket=bucket or TokenBucket(),
        concurrency=concurrency,
    )


@pytest.fixture
def engine(tmp_path, sqlite_url) -> sa.Engine:
    return db.ready_engine(load_config(write_config(tmp_path / "atlas.yaml", sqlite_url)))


def _inventory(engine: sa.Engine, client: GraphClient) -> dict[str, int]:
    summary = run_inventory_sync(engine, client, db.connection_ids(engine)["contoso"], None)
    assert not any(r.error for r in summary.results)
    return summary.graph


def _backup(engine: sa.Engine, client: GraphClient) -> dict[str, int]:
    schedule = store.find_schedule(engine, key="contoso-nightly")
    assert schedule is not None
    plan = plan_backup(schedule)
    set_id = store.create_set(
        engine,
        provider_connection_id=schedule.provider_connection_id,
        backup_schedule_id=schedule.id,
        policy_types=plan.policy_types,
    )
    summary = run_backup(engine, client, plan, set_id, None)
    assert summary.status == store.SET_COMPLETE
    return summary.graph


def _cached(engine: sa.Engine) -> set[tuple[str, str, str]]:
    t = schema.inventory_items
    with engine.connect() as conn:
        return set(conn.execute(sa.select(t.c.contract_key, t.c.external_id, t.c.content_hash)))


def _stored(engine: sa.Engine) -> list[set[tuple[str, str, str]]]:
    """Each backup set's items (contract, id, payload hash), oldest set first."""
    t = schema.backup_items
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.backup_set_id, t.c.contract_key, t.c.external_id, t.c.content_hash)
        ).all()
    sets: dict[int, set[tuple[str, str, str]]] = {}
    for set_id, *item in rows:
        sets.setdefault(set_id, set()).add(tuple(item))
    return [sets[k] for k in sorted(sets)]


@pytest.mark.parametrize(
    ("run", "outcome"), [(_inventory, _cached), (_backup, _stored)], ids=["inventory", "backup"]
)
def test_types_are_read_side_by_side_for_the_units_of_one_request_at_a_time(
    engine, contoso_sim, run, outcome
):
    one_at_a_time = run(engine, sim_client(contoso_sim, concurrency=1))
    first = outcome(engine)
    gate = Gate(contoso_sim.transport(), together=4)
    side_by_side = run(engine, sim_client(contoso_sim, concurrency=4, transport=gate))
    assert not gate.timed_out and gate.peak == 4
    assert side_by_side["request_units"] == one_at_a_time["request_units"] > 0
    assert side_by_side["requests"] == one_at_a_time["requests"]
    assert side_by_side["throttled_retries"] == one_at_a_time["throttled_retries"] == 0
    # What was written does not depend on how it was read.
    if run is _inventory:
        assert outcome(engine) == first
    else:
        older, newer = outcome(engine)
        assert newer == older == first[0]


def test_a_client_never_has_more_requests_in_flight_than_its_concurrency(contoso_sim):
    contoso_sim.faults.latency_s = 0.02  # long enough for six readers to pile up
    gate = Gate(contoso_sim.transport(), together=2)
    client = sim_client(contoso_sim, concurrency=2, transport=gate)
    keys = POLICY_CONTRACTS[:6]
    with ThreadPoolExecutor(len(keys)) as readers:
        read = list(readers.map(lambda key: list(client.read_policies(key)), keys))
    assert read == [contoso_sim.tenant.policies(key) for key in keys]
    assert not gate.timed_out and gate.peak == 2


def test_reads_side_by_side_are_all_paced_by_the_one_tenant_bucket(contoso_sim):
    # A clock that never moves: each reservation waits for every unit reserved before it beyond
    # the burst, whichever thread reserved them.
    burst, refill = 10, 100.0
    sleeps: list[float] = []
    client = sim_client(
        contoso_sim,
        concurrency=4,
        bucket=TokenBucket(burst, refill, clock=lambda: 0.0),
        sleep=sleeps.append,
    )
    with client.policy_reads(POLICY_CONTRACTS) as reads:
        assert all(read.error is None for read in reads)
    units = client.stats.request_units
    assert units > burst
    assert max(sleeps) == pytest.approx((units - burst) / refill)


def test_a_failed_sign_in_ends_every_read_not_yet_started_without_a_request(engine, contoso_sim):
    client = sim_client(contoso_sim, concurrency=2, secret="not-the-secret")
    contoso_sim.stats.reset()
    with pytest.raises(GraphError) as failed:
        run_inventory_sync(engine, client, db.connection_ids(engine)["contoso"], None)
    assert failed.value.reason_code == PROVIDER_AUTH_FAILED
    # Only the reads already running tried to sign in; nothing was cached.
    assert 1 <= contoso_sim.stats.token_requests <= 2
    assert contoso_sim.stats.total == 0
    assert _cached(engine) == set()
