"""The Microsoft Graph client, in layers: :mod:`.client` (contracts, URLs and the host guard,
paging, ``$batch``), :mod:`.auth` (Entra sign-in through msal, as an ``httpx.Auth``),
:mod:`.transport` (the httpx client, pacing, retries) and :mod:`.errors` (Graph's error bodies as
reason codes). Nothing here knows the simulator: it is plugged in as a transport."""

from atlas_dagster.graph.client import DeltaPage, GraphClient, path_pattern
from atlas_dagster.graph.errors import parse_error_body
from atlas_dagster.graph.transport import GraphStats, TokenBucket, retry_after_seconds

__all__ = [
    "DeltaPage",
    "GraphClient",
    "GraphStats",
    "TokenBucket",
    "parse_error_body",
    "path_pattern",
    "retry_after_seconds",
]
