"""The ledger schema revisions, oldest first (see batch_defs/ledger_migrations)."""
