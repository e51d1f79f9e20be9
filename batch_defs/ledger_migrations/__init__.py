"""Alembic revisions of the ledger schema, applied by batch_defs.schema.upgrade().

Each file in versions/ is one revision: `revision`, `down_revision` (the one before it) and
`upgrade()` / `downgrade()` written with `op` (`op.batch_alter_table` for column changes, so
SQLite works). The version is kept in the table batch_ledger_version, not alembic_version,
which Dagster's own schema uses in the same Postgres database.

To change a ledger table (batch_defs/ledger.py holds the target schema):

1. Change the Table in batch_defs/ledger.py.
2. Copy the newest file in versions/ to the next number, e.g. v0003_<what>.py; set
   `revision = "0003"` and `down_revision = "0002"`; write its upgrade() (add columns, backfill
   existing rows with `op.execute`) and downgrade(). Spell values out in the revision (no
   imports from batch_defs): a revision records history and must not change with the code.
   Set HEAD_REVISION in batch_defs/schema.py to the new number.
3. Run tests/test_ledger_migrations.py: it fails, listing the differences, until the revisions
   build exactly what ledger.py declares, on SQLite and on Postgres.
"""
