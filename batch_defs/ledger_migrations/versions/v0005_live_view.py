"""What Dagster says of a live run, kept beside its counts: batch_run.live_view.

A run's engine writes it every second or so (Dagster's run status and failed steps, as JSON
with the time it was read), so that `batch-defs status` of a live run reads one database and
imports nothing of Dagster. Ended runs are read from Dagster itself; the column is left as
the last view.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_run") as batch:
        batch.add_column(sa.Column("live_view", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("batch_run") as batch:
        batch.drop_column("live_view")
