"""events ordered by when they happened, from an index: `events list --limit 100` and
`--since` read the newest rows instead of sorting the whole table

The queries order by coalesce(time, recorded_at) (a line without a time of its own counts from
when it was recorded); an index on that expression, with the id to break ties, serves both
the ORDER BY and the range (SQLite and PostgreSQL both index expressions).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_when", "events",
                    [sa.text("coalesce(time, recorded_at)"), "id"])


def downgrade() -> None:
    op.drop_index("ix_events_when", table_name="events")
