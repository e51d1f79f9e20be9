"""Release 1: the ledger tables batch_item, batch_run and batch_effect as first released."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_item",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("batch", sa.String(128), nullable=False),
        sa.Column("partition", sa.String(255), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(128), nullable=False),
        sa.Column("item_key", sa.String(512), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("input", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("attempt_log", sa.Text),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("duration_s", sa.Float),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("reused_from", sa.String(64)),
        sa.Column("worker", sa.String(128)),
        sa.UniqueConstraint("run_id", "phase", "item_key", name="uq_batch_item_run_phase_key"),
    )
    op.create_index("ix_batch_item_partition", "batch_item",
                    ["batch", "partition", "phase", "item_key"])
    op.create_index("ix_batch_item_run_status", "batch_item", ["run_id", "status"])
    op.create_table(
        "batch_run",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("batch", sa.String(128), nullable=False),
        sa.Column("partition", sa.String(255), nullable=False),
        sa.Column("parent_run_id", sa.String(64)),
        sa.Column("total_items", sa.Integer, nullable=False),
        sa.Column("phases", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stop_reason", sa.Text),
        sa.Column("summary", sa.Text),
    )
    op.create_table(
        "batch_effect",
        sa.Column("idempotency_key", sa.String(1024), primary_key=True),
        sa.Column("value", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("batch_effect", "batch_run", "batch_item"):
        op.drop_table(table)
