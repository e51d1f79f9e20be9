"""Skip causes, stop kinds and partition leases: batch_item.skip_cause, batch_run.stop_kind and
the table batch_lease; existing rows get their cause and kind from the error and reason texts.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The values of states.SkipCause and StopKind when this revision was written.
DEPENDENCY_ERROR = "dependency "  # how a skip for a failed or cyclic dependency began
STOP_KINDS = ("fail_fast", "paused", "canceled", "budget")  # stop reasons began "<kind>:"

item = sa.table("batch_item", sa.column("status"), sa.column("error"), sa.column("skip_cause"))
run = sa.table("batch_run", sa.column("stop_reason"), sa.column("stop_kind"))


def upgrade() -> None:
    with op.batch_alter_table("batch_item") as batch:
        batch.add_column(sa.Column("skip_cause", sa.String(16)))
    with op.batch_alter_table("batch_run") as batch:
        batch.add_column(sa.Column("stop_kind", sa.String(16)))
    op.create_table(
        "batch_lease",
        sa.Column("batch", sa.String(128), primary_key=True),
        sa.Column("partition", sa.String(255), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    # substr, not LIKE: "_" in fail_fast is a LIKE wildcard, and LIKE ignores case in SQLite.
    by_dependency = sa.func.substr(item.c.error, 1, len(DEPENDENCY_ERROR)) == DEPENDENCY_ERROR
    op.execute(item.update().where(item.c.status == "skipped").values(
        skip_cause=sa.case((by_dependency, "dependency"), else_="handler")))
    reason = run.c.stop_reason
    op.execute(run.update().where(reason.is_not(None)).values(stop_kind=sa.case(
        *[(sa.or_(reason == kind, sa.func.substr(reason, 1, len(kind) + 1) == f"{kind}:"), kind)
          for kind in STOP_KINDS],
        else_=None)))


def downgrade() -> None:
    op.drop_table("batch_lease")
    with op.batch_alter_table("batch_run") as batch:
        batch.drop_column("stop_kind")
    with op.batch_alter_table("batch_item") as batch:
        batch.drop_column("skip_cause")
