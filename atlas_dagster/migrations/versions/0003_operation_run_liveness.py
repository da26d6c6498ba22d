"""operation runs record where their work runs, its fencing token and its heartbeat

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import atlas_dagster.schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("operation_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("executor", JSONType))
        batch_op.add_column(sa.Column("executor_token", sa.String(length=64)))
        batch_op.add_column(
            sa.Column("heartbeat_at", atlas_dagster.schema.UTCDateTime(timezone=True))
        )


def downgrade() -> None:
    with op.batch_alter_table("operation_runs", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("executor_token")
        batch_op.drop_column("executor")
