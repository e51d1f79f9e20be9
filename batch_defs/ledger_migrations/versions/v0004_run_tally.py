"""A running tally of each run's rows: the table batch_tally, kept by triggers on batch_item.

Counting a run (status, summaries, progress) read every one of its rows: 1.2 s of CPU at a
million. The triggers add each written row to its group (phase, status, skip cause, carried
over) and take a rewritten row's old values out of the group it left, so a count is one read
of a few rows. Existing rows are counted once here.

On SQLite the whole database has one writer at a time: every row goes to shard 0. On Postgres
each connection adds to its own shard (its backend pid), so writers committing side by side
never wait on one another's counts, and no two of them can deadlock over them.

Rows leave batch_item only with their whole run (Ledger.delete_partition), which deletes the
run's tally rows in the same transaction: no trigger counts deletes.

A later revision that recreates batch_item on SQLite (op.batch_alter_table does, to change a
column) drops these triggers with the old table and must create them again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

GROUP_KEY = "run_id, phase, status, skip_cause, reused, shard"
COLUMNS = f"{GROUP_KEY}, row_count, cost, tokens, work_s, first_started, last_finished"


def row_values(row: str, sign: str, shard: str) -> str:
    """The VALUES of one row's contribution (`sign` +1 or -1) to its group."""
    times = (f"{row}.started_at, {row}.finished_at" if sign == "1" else "NULL, NULL")
    return (f"({row}.run_id, {row}.phase, {row}.status, coalesce({row}.skip_cause, ''), "
            f"{row}.reused_from IS NOT NULL, {shard}, {sign}, {sign} * {row}.cost, "
            f"{sign} * {row}.tokens, {sign} * coalesce({row}.duration_s, 0), {times})")


def add_to_group(row: str, sign: str, shard: str, least: str, greatest: str) -> str:
    """Add a row's contribution to its group's tally row, creating the row if need be.

    A rewritten row's old times stay in its old group's first/last: they are when that work
    really started and ended."""
    sums = ", ".join(f"{c} = batch_tally.{c} + excluded.{c}"
                     for c in ("row_count", "cost", "tokens", "work_s"))
    return (
        f"INSERT INTO batch_tally ({COLUMNS}) VALUES {row_values(row, sign, shard)} "
        f"ON CONFLICT ({GROUP_KEY}) DO UPDATE SET {sums}, "
        f"first_started = {least}(coalesce(batch_tally.first_started, excluded.first_started),"
        " coalesce(excluded.first_started, batch_tally.first_started)), "
        f"last_finished = {greatest}(coalesce(batch_tally.last_finished, excluded.last_finished),"
        " coalesce(excluded.last_finished, batch_tally.last_finished))")


def sqlite_triggers() -> list[str]:
    def add(row: str, sign: str) -> str:
        return add_to_group(row, sign, "0", "min", "max")

    return [
        f"CREATE TRIGGER batch_tally_insert AFTER INSERT ON batch_item BEGIN "
        f"{add('NEW', '1')}; END",
        f"CREATE TRIGGER batch_tally_update AFTER UPDATE ON batch_item BEGIN "
        f"{add('OLD', '-1')}; {add('NEW', '1')}; END",
    ]


def postgres_triggers() -> list[str]:
    def add(row: str, sign: str) -> str:
        return add_to_group(row, sign, "pg_backend_pid()", "LEAST", "GREATEST")

    return [
        "CREATE FUNCTION batch_tally_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF TG_OP = 'UPDATE' THEN {add('OLD', '-1')}; END IF; "
        f"{add('NEW', '1')}; RETURN NULL; END $$",
        "CREATE TRIGGER batch_tally_count AFTER INSERT OR UPDATE ON batch_item "
        "FOR EACH ROW EXECUTE FUNCTION batch_tally_count()",
    ]


def upgrade() -> None:
    op.create_table(
        "batch_tally",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("phase", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("skip_cause", sa.String(16), primary_key=True),
        sa.Column("reused", sa.Boolean, primary_key=True),
        sa.Column("shard", sa.BigInteger, primary_key=True),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("work_s", sa.Float, nullable=False),
        sa.Column("first_started", sa.Float),
        sa.Column("last_finished", sa.Float),
    )
    op.execute(
        f"INSERT INTO batch_tally ({COLUMNS}) "
        "SELECT run_id, phase, status, coalesce(skip_cause, ''), reused_from IS NOT NULL, 0, "
        "count(*), coalesce(sum(cost), 0), coalesce(sum(tokens), 0), "
        "coalesce(sum(duration_s), 0), min(started_at), max(finished_at) FROM batch_item "
        "GROUP BY run_id, phase, status, coalesce(skip_cause, ''), reused_from IS NOT NULL")
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in postgres_triggers() if postgres else sqlite_triggers():
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER batch_tally_count ON batch_item")
        op.execute("DROP FUNCTION batch_tally_count()")
    else:
        op.execute("DROP TRIGGER batch_tally_insert")
        op.execute("DROP TRIGGER batch_tally_update")
    op.drop_table("batch_tally")
