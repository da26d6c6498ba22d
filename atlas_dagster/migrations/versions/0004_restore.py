"""restore plans and items; write readiness per contract; a plan executes once

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import atlas_dagster.schema

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = atlas_dagster.schema.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("provider_connection_checks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("write_status", sa.String(length=32)))
        batch_op.add_column(sa.Column("write_missing_permissions", JSONType))
    with op.batch_alter_table("operation_runs", schema=None) as batch_op:
        batch_op.create_index(
            "uq_operation_runs_restore_execute_identity",
            ["run_identity_hash"],
            unique=True,
            sqlite_where=sa.text("type = 'restore.execute'"),
            postgresql_where=sa.text("type = 'restore.execute'"),
        )
    op.create_table(
        "restore_plans",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("backup_set_id", Id, nullable=False),
        sa.Column("source_provider_connection_id", Id, nullable=False),
        sa.Column("provider_connection_id", Id, nullable=False),
        sa.Column("target_tenant_id", sa.String(length=255), nullable=False),
        sa.Column("selection", JSONType, nullable=False),
        sa.Column("options", JSONType, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("executed_at", UTC, nullable=True),
        sa.Column("completed_at", UTC, nullable=True),
        sa.Column("operation_run_id", Id, nullable=True),
        sa.Column("execute_operation_run_id", Id, nullable=True),
        sa.Column("summary_counts", JSONType, nullable=False),
        sa.CheckConstraint(
            "status IN ('planned', 'executing', 'executed')", name="ck_restore_plans_status"
        ),
        sa.ForeignKeyConstraint(
            ["backup_set_id"],
            ["backup_sets.id"],
            name=op.f("fk_restore_plans_backup_set_id_backup_sets"),
        ),
        sa.ForeignKeyConstraint(
            ["source_provider_connection_id"],
            ["provider_connections.id"],
            name=op.f("fk_restore_plans_source_provider_connection_id_provider_connections"),
        ),
        sa.ForeignKeyConstraint(
            ["provider_connection_id"],
            ["provider_connections.id"],
            name=op.f("fk_restore_plans_provider_connection_id_provider_connections"),
        ),
        sa.ForeignKeyConstraint(
            ["operation_run_id"],
            ["operation_runs.id"],
            name=op.f("fk_restore_plans_operation_run_id_operation_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["execute_operation_run_id"],
            ["operation_runs.id"],
            name=op.f("fk_restore_plans_execute_operation_run_id_operation_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_restore_plans")),
    )
    with op.batch_alter_table("restore_plans", schema=None) as batch_op:
        batch_op.create_index(
            "ix_restore_plans_connection", ["provider_connection_id", "created_at"], unique=False
        )
    op.create_table(
        "restore_items",
        sa.Column("restore_plan_id", Id, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("contract_key", sa.String(length=64), nullable=False),
        sa.Column("policy_type", sa.String(length=128), nullable=True),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.Column("source_external_id", sa.String(length=255), nullable=False),
        sa.Column("target_external_id", sa.String(length=255), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("changes", JSONType, nullable=False),
        sa.Column("writes", JSONType, nullable=False),
        sa.Column("target_hash_at_plan", sa.String(length=64), nullable=True),
        sa.Column("planned_view", JSONType, nullable=True),
        sa.Column("result", sa.String(length=32), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("completed_at", UTC, nullable=True),
        sa.CheckConstraint(
            "action IN ('create', 'update', 'unchanged', 'skip', 'blocked')",
            name="ck_restore_items_action",
        ),
        sa.ForeignKeyConstraint(
            ["restore_plan_id"],
            ["restore_plans.id"],
            name=op.f("fk_restore_items_restore_plan_id_restore_plans"),
        ),
        sa.PrimaryKeyConstraint("restore_plan_id", "position", name=op.f("pk_restore_items")),
    )


def downgrade() -> None:
    op.drop_table("restore_items")
    with op.batch_alter_table("restore_plans", schema=None) as batch_op:
        batch_op.drop_index("ix_restore_plans_connection")
    op.drop_table("restore_plans")
    with op.batch_alter_table("operation_runs", schema=None) as batch_op:
        batch_op.drop_index("uq_operation_runs_restore_execute_identity")
    with op.batch_alter_table("provider_connection_checks", schema=None) as batch_op:
        batch_op.drop_column("write_missing_permissions")
        batch_op.drop_column("write_status")
