"""a failed action run that will be tried again says when, in a column (retry_at)

Before, the retry was prose appended to the run's detail ("; retrying in 60 s", "; retrying at
the next start") and found again by searching for it. Old rows are converted: a failed run
whose detail says it is retried gets its own time as retry_at (due at the next start).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("action_runs") as batch:
        batch.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE action_runs SET retry_at = at "
               "WHERE status = 'failed' AND detail LIKE '%; retrying %'")


def downgrade() -> None:
    with op.batch_alter_table("action_runs") as batch:
        batch.drop_column("retry_at")
