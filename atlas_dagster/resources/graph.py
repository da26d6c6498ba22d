"""The Dagster side of the Graph client: one process-level GraphClient per connection, handed out
by :class:`GraphClientResource`. A ``simulated:`` connection is served in-process by the simulator
registered under its key, plugged in as the client's transport."""

from __future__ import annotations

import threading

import dagster as dg

from atlas_dagster.config import ProviderConnection, Secret
from atlas_dagster.graph import GraphClient

# Dagster builds resources on every sensor tick; the clients (and their sign-ins) outlive that.
# The simulator a client was built for is kept with it: a test that installs another simulator
# for the key gets a new client.
_clients: dict[ProviderConnection, tuple[object, GraphClient]] = {}
_clients_lock = threading.Lock()


def client_for(connection: ProviderConnection) -> GraphClient:
    """The process's GraphClient for a connection. A simulated connection signs in as the
    simulated tenant's app, through the simulator's transport."""
    if connection.simulated is None:
        sim = None
    else:
        from atlas_dagster.simulator import simulator_for

        sim = simulator_for(connection.key, connection.simulated.profile, connection.simulated.seed)
    with _clients_lock:
        cached = _clients.get(connection)
    if cached is not None and cached[0] is sim:
        return cached[1]
    if sim is None:
        client = GraphClient(connection)
    else:
        tenant = sim.tenant
        signed_in_as = connection.model_copy(
            update={
                "tenant_id": tenant.tenant_id,
                "client_id": tenant.client_id,
                "client_secret": Secret(sim.client_secret),
                "certificate": None,
            }
        )
        client = GraphClient(signed_in_as, transport=sim.transport())
    with _clients_lock:
        _clients[connection] = (sim, client)
    return client


class GraphClientResource(dg.ConfigurableResource):
    """Hands out the process-level GraphClient of a connection; building it costs nothing."""

    def client(self, connection: ProviderConnection) -> GraphClient:
        return client_for(connection)
