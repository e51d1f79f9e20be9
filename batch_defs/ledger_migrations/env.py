"""Alembic environment of the ledger: migrates the connection batch_defs.schema passes in."""

from alembic import context

from batch_defs.schema import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("ledger migrations run through batch_defs.schema.upgrade(engine)")
# The caller holds the transaction (and the lock around it): alembic joins it, commits nothing.
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
