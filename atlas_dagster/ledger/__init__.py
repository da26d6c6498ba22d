"""The operation ledger, ``operation_runs``: run types (run_types), the store (store), where work
runs and when it is dead (liveness), starts (start), the job side (job), the mirror of Dagster
runs (mirror), convergence (reconcile) and the sensors (sensors). See docs/architecture.md."""
