"""backup items record their assignments' group and filter names

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("backup_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assignment_names_hash", sa.String(length=64)))
        batch_op.create_foreign_key(
            op.f("fk_backup_items_assignment_names_hash_backup_payloads"),
            "backup_payloads",
            ["assignment_names_hash"],
            ["content_hash"],
        )
        batch_op.create_index(
            "ix_backup_items_assignment_names_hash", ["assignment_names_hash"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("backup_items", schema=None) as batch_op:
        batch_op.drop_index("ix_backup_items_assignment_names_hash")
        batch_op.drop_constraint(
            op.f("fk_backup_items_assignment_names_hash_backup_payloads"), type_="foreignkey"
        )
        batch_op.drop_column("assignment_names_hash")
