"""Routes, live settings, shared rate limits and child processes: batch_item.branch,
batch_run.settings, and the tables batch_limit and batch_process."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_item") as batch:
        batch.add_column(sa.Column("branch", sa.String(128)))
    with op.batch_alter_table("batch_run") as batch:
        batch.add_column(sa.Column("settings", sa.Text))
    op.create_table(
        "batch_limit",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("rate_per_s", sa.Float, nullable=False),
        sa.Column("capacity", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("state", sa.Text),
    )
    op.create_table(
        "batch_process",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(128), nullable=False),
        sa.Column("item_key", sa.String(512), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pgid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
    )
    op.create_index("ix_batch_process_run", "batch_process", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_batch_process_run", "batch_process")
    op.drop_table("batch_process")
    op.drop_table("batch_limit")
    with op.batch_alter_table("batch_run") as batch:
        batch.drop_column("settings")
    with op.batch_alter_table("batch_item") as batch:
        batch.drop_column("branch")
