"""The ledger's schema version: upgrade() brings a ledger database to this release's tables.

The revisions are Alembic scripts in batch_defs/ledger_migrations (its docstring says how to
add one); the version lives in the table batch_ledger_version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:  # Alembic is imported when a ledger needs a change, not by every command
    from alembic.config import Config

# Not alembic_version: Dagster's own schema keeps its version there, in the same Postgres database.
VERSION_TABLE = "batch_ledger_version"
SCRIPT_LOCATION = "batch_defs:ledger_migrations"
# Ledgers written before the schema was versioned have release 1's tables and no version table.
RELEASE_1 = "0001"
# The newest revision in ledger_migrations/versions; tests/test_ledger_migrations.py checks
# that Alembic finds the same.
HEAD_REVISION = "0005"
# pg_advisory_xact_lock key serialising ledger upgrades in one database ("ledger01" in ASCII).
PG_LOCK_KEY = 0x6C65646765723031


class LedgerSchemaError(RuntimeError):
    """The ledger database cannot be brought to the schema of this release."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration of the ledger revisions (no alembic.ini), migrating `connection`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this code expects: the newest one in ledger_migrations/versions."""
    return HEAD_REVISION


def alembic_head() -> str:
    """The newest revision as Alembic finds it (it loads every revision script: 0.1 s, too
    much for each command that opens a ledger, hence HEAD_REVISION)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "ledger_migrations/versions holds no revision"
    return head


def stored_revision(connection: sa.Connection) -> str | None:
    """The database's revision; None for a new ledger or one written before versioning."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine) -> None:
    """Bring the ledger tables to the newest revision: one query when they are there already.

    Safe when several processes start on one database at once: the upgrade runs under a lock
    (Postgres advisory lock, SQLite write lock), and whoever waited finds the work done.
    """
    head = head_revision()
    if _quick_revision(engine) == head:
        return
    from alembic import command

    with _exclusive(engine) as conn:
        current = stored_revision(conn)
        if current == head:
            return
        config = alembic_config(conn)
        if current is None:
            current = _unversioned_revision(conn)
            if current is not None:
                command.stamp(config, current)
        elif current not in _known_revisions(config):
            raise LedgerSchemaError(
                f"ledger database {_shown(engine)} is at schema revision {current}, newer than "
                f"this batch-defs knows (up to {head}): install the release that wrote it")
        _migrate(engine, config, current, head, command.upgrade)


def downgrade(engine: sa.Engine, revision: str) -> None:
    """Take the ledger tables back to `revision` (e.g. RELEASE_1 before reinstalling release 1).

    Columns and tables that revision does not have are dropped with their data.
    """
    from alembic import command

    with _exclusive(engine) as conn:
        current = stored_revision(conn)
        if current is None:
            raise LedgerSchemaError(f"ledger database {_shown(engine)} has no schema version")
        _migrate(engine, alembic_config(conn), current, revision, command.downgrade)


def _migrate(engine: sa.Engine, config: Config, current: str | None, target: str,
             step: Callable[[Config, str], None]) -> None:
    from alembic.util import CommandError

    try:
        step(config, target)
    except (sa.exc.SQLAlchemyError, CommandError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LedgerSchemaError(
            f"ledger database {_shown(engine)}: schema revision {current or 'none'} to {target} "
            f"failed, nothing was changed: {first_line}") from exc


def _quick_revision(engine: sa.Engine) -> str | None:
    """The stored revision in one query; None if that query fails (no version table yet)."""
    version = sa.table(VERSION_TABLE, sa.column("version_num"))
    with engine.connect() as conn:
        try:
            return conn.execute(sa.select(version.c.version_num)).scalar()
        except sa.exc.DBAPIError:
            return None


@contextmanager
def _exclusive(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that no other schema change of this database runs beside; commits at
    the end, rolls back on error (Postgres and SQLite change tables transactionally)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # Transaction-level: released at commit or rollback, even if the process dies.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_LOCK_KEY)))
        elif engine.dialect.name == "sqlite":
            # Take the write lock before reading the version, so the reading is still true
            # when we write (a deferred transaction would read first and collide later).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn
        conn.commit()


def _unversioned_revision(conn: sa.Connection) -> str | None:
    """Release 1 for a ledger that has its tables but no version; None for an empty one."""
    return RELEASE_1 if sa.inspect(conn).has_table("batch_item") else None


def _known_revisions(config: Config) -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def _shown(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
