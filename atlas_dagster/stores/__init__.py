"""What the assets persist, one module per family of tables: the tenant cache (cache, inventory,
groups), readiness checks (checks), backups (backups, with its diff in backup_diff and its export
in backup_export), and the bulk writes they share (bulk). Assets read Graph and decide; stores
hold every SQL statement. A store writes through the engine it is given, so a job's writes stay
fenced by its ledger row. See docs/architecture.md."""
