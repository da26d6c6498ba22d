"""The application database schema (the analysts' contract), as SQLAlchemy Core tables.

The same schema serves SQLite (embedded default) and PostgreSQL (production); Alembic migrations
under ``migrations/`` create it, and a test checks that migrating to head yields exactly these
tables. Every cached row carries ``provider_connection_id``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC timestamps on both backends (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _conn_fk(nullable: bool = False) -> sa.Column:
    return sa.Column(
        "provider_connection_id",
        Id,
        sa.ForeignKey("provider_connections.id"),
        nullable=nullable,
    )


provider_connections = sa.Table(
    "provider_connections",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(63), nullable=False, unique=True),
    sa.Column("display_name", sa.String(255), nullable=False),
    sa.Column("tenant_id", sa.String(255)),
    sa.Column("client_id", sa.String(64)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

backup_schedules = sa.Table(
    "backup_schedules",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(63), nullable=False, unique=True),
    _conn_fk(),
    sa.Column("cron", sa.String(120), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("policy_types", JSONType, nullable=False),
    sa.Column("retention_days", sa.Integer, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Key/value facts the views need (the Dagster webserver URL for run links).
atlas_settings = sa.Table(
    "atlas_settings",
    metadata,
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

operation_runs = sa.Table(
    "operation_runs",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    _conn_fk(nullable=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("run_identity_hash", sa.String(64), nullable=False),
    sa.Column("context", JSONType, nullable=False),
    sa.Column("summary_counts", JSONType, nullable=False),
    sa.Column("failure_summary", JSONType, nullable=False),
    sa.Column("trigger_source", sa.String(32), nullable=False),
    sa.Column("initiator", sa.String(255), nullable=False),
    sa.Column("dagster_run_id", sa.String(64)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("completed_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Liveness: where the work runs ({host, boot_id, pid, process_started}), the token that
    # fences its writes, and its last heartbeat (see atlas_dagster/liveness.py).
    sa.Column("executor", JSONType),
    sa.Column("executor_token", sa.String(64)),
    sa.Column("heartbeat_at", UTCDateTime),
    sa.CheckConstraint(
        "status IN ('queued', 'running', 'completed')", name="ck_operation_runs_status"
    ),
    sa.CheckConstraint(
        "outcome IN ('pending', 'succeeded', 'partially_succeeded', 'failed', 'cancelled')",
        name="ck_operation_runs_outcome",
    ),
    # Active dedupe lives in the database: one queued/running row per identity.
    sa.Index(
        "uq_operation_runs_active_identity",
        "provider_connection_id",
        "run_identity_hash",
        unique=True,
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    ),
    # A scheduled backup identity exists once, in any status.
    sa.Index(
        "uq_operation_runs_scheduled_identity",
        "run_identity_hash",
        unique=True,
        sqlite_where=sa.text("type = 'backup_schedule.scheduled'"),
        postgresql_where=sa.text("type = 'backup_schedule.scheduled'"),
    ),
    # A plan executes at most once: its execution's identity exists once, in any status.
    sa.Index(
        "uq_operation_runs_restore_execute_identity",
        "run_identity_hash",
        unique=True,
        sqlite_where=sa.text("type = 'restore.execute'"),
        postgresql_where=sa.text("type = 'restore.execute'"),
    ),
    sa.Index("uq_operation_runs_dagster_run_id", "dagster_run_id", unique=True),
    sa.Index("ix_operation_runs_conn_type_created", "provider_connection_id", "type", "created_at"),
    sa.Index("ix_operation_runs_status", "status"),
)

inventory_items = sa.Table(
    "inventory_items",
    metadata,
    _conn_fk(),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("external_id", sa.String(255), nullable=False),
    sa.Column("odata_type", sa.String(255)),
    sa.Column("policy_type", sa.String(128), nullable=False),
    sa.Column("display_name", sa.Text),
    sa.Column("platform", sa.String(32)),
    sa.Column("last_modified_at", UTCDateTime),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("is_builtin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_seen_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    sa.Column("deleted_at", UTCDateTime),
    sa.PrimaryKeyConstraint("provider_connection_id", "contract_key", "external_id"),
    sa.Index("ix_inventory_items_policy_type", "provider_connection_id", "policy_type"),
)

inventory_assignments = sa.Table(
    "inventory_assignments",
    metadata,
    _conn_fk(),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("external_id", sa.String(255), nullable=False),
    sa.Column("target_type", sa.String(128), nullable=False),
    sa.Column("group_id", sa.String(64)),
    sa.Column("filter_id", sa.String(64)),
    sa.Column("filter_type", sa.String(32)),
    sa.Column("intent", sa.String(32), nullable=False),
    sa.Index(
        "ix_inventory_assignments_item", "provider_connection_id", "contract_key", "external_id"
    ),
    sa.Index("ix_inventory_assignments_group", "provider_connection_id", "group_id"),
)

directory_groups = sa.Table(
    "directory_groups",
    metadata,
    _conn_fk(),
    sa.Column("group_id", sa.String(64), nullable=False),
    sa.Column("display_name", sa.Text),
    sa.Column("mail", sa.Text),
    sa.Column("mail_nickname", sa.Text),
    sa.Column("security_enabled", sa.Boolean),
    sa.Column("mail_enabled", sa.Boolean),
    sa.Column("group_types", JSONType),
    sa.Column("membership_rule", sa.Text),
    sa.Column("created_at", UTCDateTime),
    sa.Column("first_seen_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    sa.Column("deleted_at", UTCDateTime),
    sa.PrimaryKeyConstraint("provider_connection_id", "group_id"),
)

directory_delta_links = sa.Table(
    "directory_delta_links",
    metadata,
    _conn_fk(),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("delta_link", sa.Text, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.PrimaryKeyConstraint("provider_connection_id", "contract_key"),
)

backup_sets = sa.Table(
    "backup_sets",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    _conn_fk(),
    sa.Column("backup_schedule_id", Id, sa.ForeignKey("backup_schedules.id")),
    sa.Column("operation_run_id", Id, sa.ForeignKey("operation_runs.id")),
    sa.Column("scheduled_for", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("completed_at", UTCDateTime),
    sa.Column("item_count", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("policy_types", JSONType, nullable=False),
    sa.Column("failure_summary", JSONType, nullable=False),
    sa.Index("ix_backup_sets_schedule", "backup_schedule_id", "created_at"),
)

backup_payloads = sa.Table(
    "backup_payloads",
    metadata,
    sa.Column("content_hash", sa.String(64), primary_key=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

backup_items = sa.Table(
    "backup_items",
    metadata,
    sa.Column("backup_set_id", Id, sa.ForeignKey("backup_sets.id"), nullable=False),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("external_id", sa.String(255), nullable=False),
    sa.Column("policy_type", sa.String(128)),
    sa.Column("display_name", sa.Text),
    sa.Column(
        "content_hash",
        sa.String(64),
        sa.ForeignKey("backup_payloads.content_hash"),
        nullable=False,
    ),
    # The names of the groups and filters the assignments targeted when the backup was taken
    # (a JSON document in backup_payloads): ids mean nothing in another tenant, names do.
    sa.Column(
        "assignment_names_hash", sa.String(64), sa.ForeignKey("backup_payloads.content_hash")
    ),
    sa.PrimaryKeyConstraint("backup_set_id", "contract_key", "external_id"),
    sa.Index("ix_backup_items_content_hash", "content_hash"),
    sa.Index("ix_backup_items_assignment_names_hash", "assignment_names_hash"),
)

provider_connection_checks = sa.Table(
    "provider_connection_checks",
    metadata,
    _conn_fk(),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("missing_permissions", JSONType, nullable=False),
    sa.Column("reason_code", sa.String(64)),
    sa.Column("message", sa.Text),
    sa.Column("checked_at", UTCDateTime, nullable=False),
    sa.Column("operation_run_id", Id, sa.ForeignKey("operation_runs.id")),
    # Write readiness of a policy collection (restore): ready, missing_permission, or
    # not_writable (Graph takes no writes of it); the permissions its writes lack.
    sa.Column("write_status", sa.String(32)),
    sa.Column("write_missing_permissions", JSONType),
    sa.PrimaryKeyConstraint("provider_connection_id", "contract_key"),
)

# Restore (DESIGN §9): a plan that only read the target tenant, and its items.
restore_plans = sa.Table(
    "restore_plans",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("backup_set_id", Id, sa.ForeignKey("backup_sets.id"), nullable=False),
    sa.Column(
        "source_provider_connection_id",
        Id,
        sa.ForeignKey("provider_connections.id"),
        nullable=False,
    ),
    _conn_fk(),
    # The tenant the plan read: execute refuses a connection that now points elsewhere.
    sa.Column("target_tenant_id", sa.String(255), nullable=False),
    sa.Column("selection", JSONType, nullable=False),
    sa.Column("options", JSONType, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("executed_at", UTCDateTime),
    sa.Column("completed_at", UTCDateTime),
    sa.Column("operation_run_id", Id, sa.ForeignKey("operation_runs.id")),
    sa.Column("execute_operation_run_id", Id, sa.ForeignKey("operation_runs.id")),
    sa.Column("summary_counts", JSONType, nullable=False),
    sa.CheckConstraint(
        "status IN ('planned', 'executing', 'executed')", name="ck_restore_plans_status"
    ),
    sa.Index("ix_restore_plans_connection", "provider_connection_id", "created_at"),
)

restore_items = sa.Table(
    "restore_items",
    metadata,
    sa.Column("restore_plan_id", Id, sa.ForeignKey("restore_plans.id"), nullable=False),
    # Execution order: references (scope tags, filters) before the policies that use them.
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("contract_key", sa.String(64), nullable=False),
    sa.Column("policy_type", sa.String(128)),
    sa.Column("display_name", sa.Text),
    sa.Column("source_external_id", sa.String(255), nullable=False),
    sa.Column("target_external_id", sa.String(255)),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("reason_code", sa.String(64)),
    sa.Column("message", sa.Text),
    sa.Column("changes", JSONType, nullable=False),
    # The writes the item takes, in order, each with its request body (secrets never: an item
    # holding a masked secret is skipped).
    sa.Column("writes", JSONType, nullable=False),
    sa.Column("target_hash_at_plan", sa.String(64)),
    # What the item's target is to look like afterwards (its restorable view, references
    # mapped): the read-back compares with it.
    sa.Column("planned_view", JSONType),
    sa.Column("result", sa.String(32)),
    sa.Column("verified", sa.Boolean),
    sa.Column("error", sa.Text),
    sa.Column("completed_at", UTCDateTime),
    sa.PrimaryKeyConstraint("restore_plan_id", "position"),
    sa.CheckConstraint(
        "action IN ('create', 'update', 'unchanged', 'skip', 'blocked')",
        name="ck_restore_items_action",
    ),
)

# Views for humans. Plain SQL that both SQLite and PostgreSQL accept.
VIEWS: dict[str, str] = {
    "v_operation_runs": """
        SELECT r.id, pc.key AS provider_connection, r.provider_connection_id, r.type, r.status,
               r.outcome, r.trigger_source, r.initiator, r.created_at, r.started_at,
               r.completed_at, r.updated_at, r.summary_counts, r.failure_summary, r.context,
               r.dagster_run_id,
               CASE WHEN r.dagster_run_id IS NULL THEN NULL
                    ELSE COALESCE((SELECT s.value FROM atlas_settings s
                                   WHERE s.key = 'dagster_webserver_url'),
                                  'http://127.0.0.1:3000')
                         || '/runs/' || r.dagster_run_id END AS dagster_run_url
        FROM operation_runs r
        LEFT JOIN provider_connections pc ON pc.id = r.provider_connection_id
    """,
    "v_inventory_current": """
        SELECT pc.key AS provider_connection, i.provider_connection_id, i.contract_key,
               i.external_id, i.odata_type, i.policy_type, i.display_name, i.platform,
               i.is_builtin, i.last_modified_at, i.content_hash, i.first_seen_at,
               i.last_seen_at, i.payload
        FROM inventory_items i
        JOIN provider_connections pc ON pc.id = i.provider_connection_id
        WHERE i.deleted_at IS NULL
    """,
    "v_assignments_readable": """
        SELECT pc.key AS provider_connection, a.provider_connection_id, a.contract_key,
               a.external_id, i.display_name AS policy_name, i.policy_type, a.target_type,
               a.intent, a.group_id,
               CASE WHEN a.group_id IS NULL THEN NULL
                    ELSE COALESCE(g.display_name, a.group_id) END AS group_name,
               g.deleted_at AS group_deleted_at,
               a.filter_id, f.display_name AS filter_name, a.filter_type
        FROM inventory_assignments a
        JOIN provider_connections pc ON pc.id = a.provider_connection_id
        JOIN inventory_items i ON i.provider_connection_id = a.provider_connection_id
             AND i.contract_key = a.contract_key AND i.external_id = a.external_id
        LEFT JOIN directory_groups g ON g.provider_connection_id = a.provider_connection_id
             AND g.group_id = a.group_id
        LEFT JOIN inventory_items f ON f.provider_connection_id = a.provider_connection_id
             AND f.contract_key = 'assignment_filters' AND f.external_id = a.filter_id
        WHERE i.deleted_at IS NULL
    """,
}

# Every table: what the read-only role may read, and what tests search for leaked secrets.
CACHED_TABLES = tuple(metadata.tables)
