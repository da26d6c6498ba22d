"""Alembic environment: runs against the engine handed over by ``atlas_dagster.db``."""

from alembic import context

from atlas_dagster import schema

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # `alembic` CLI use: the URL comes from the atlas config
    from atlas_dagster.config import load_config
    from atlas_dagster.db import engine_for

    engine = engine_for(load_config().database_url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=schema.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
