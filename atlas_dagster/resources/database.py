"""The application database as a Dagster resource.

The resource carries no URL and no secret — only where the atlas config lives. The URL (which may
hold a password) is read from the config at run time, so it never shows in the Dagster UI.
"""

from __future__ import annotations

import os

import dagster as dg
from sqlalchemy.engine import Engine

from atlas_dagster.config import AtlasConfig
from atlas_dagster.db import cached_config, ready_engine


class DatabaseResource(dg.ConfigurableResource):
    """Where the atlas config lives; the database comes from it."""

    config_path: str | None = None

    def config(self) -> AtlasConfig:
        return cached_config(self.config_path or os.environ.get("ATLAS_CONFIG"))

    def engine(self) -> Engine:
        return ready_engine(self.config())
