"""saved kernel settings (the tcp_syncookies value to restore)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saved_settings",
        sa.Column("netns", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("saved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("netns", "name"),
    )


def downgrade() -> None:
    op.drop_table("saved_settings")
