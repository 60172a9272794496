"""a fleet's changes, numbered: nodes read the fleet bans decided or lifted since the last one
they saw, instead of every ban in force every few seconds

``bans.fleet_seq``: set on a fleet ban when it is decided (its origin row) and again when it is
lifted everywhere (`synwatch unban`), from one counter that grows in commit order (the writer
holds a transaction lock while it numbers: synwatch/store/writes.py). A node polls
``fleet_seq > the last it saw`` through the index, which costs an index probe when nothing
changed, whatever the number of bans in force. Fleet bans already there are numbered by id.

Every few minutes a node also looks at every fleet ban in force it has not copied (rows written
without a number: a node of an older synwatch during an upgrade). Two indexes keep that look as
cheap as the bans decided, not the copies (a fleet of N nodes holds N - 1 copies of each): a
partial index of the fleet bans in force, and the copies by (origin_id, host) instead of
origin_id alone.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# as synwatch/store/models.py has it, written out: a migration stays as it was written
FLEET_IN_FORCE = "scope = 'fleet' AND origin_id IS NULL AND removed_at IS NULL"
COPIES = "origin_id IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("bans") as batch:
        batch.add_column(sa.Column("fleet_seq", sa.BigInteger(), nullable=True))
    op.execute("UPDATE bans SET fleet_seq = id WHERE scope = 'fleet' AND origin_id IS NULL")
    op.create_index("ix_bans_fleet_seq", "bans", ["fleet_seq"])
    op.drop_index("ix_bans_origin", table_name="bans")
    op.create_index("ix_bans_origin_host", "bans", ["origin_id", "host"],
                    postgresql_where=sa.text(COPIES), sqlite_where=sa.text(COPIES))
    op.create_index("ix_bans_fleet_in_force", "bans", ["id"],
                    postgresql_where=sa.text(FLEET_IN_FORCE), sqlite_where=sa.text(FLEET_IN_FORCE))


def downgrade() -> None:
    op.drop_index("ix_bans_fleet_in_force", table_name="bans")
    op.drop_index("ix_bans_origin_host", table_name="bans")
    op.create_index("ix_bans_origin", "bans", ["origin_id"])
    op.drop_index("ix_bans_fleet_seq", table_name="bans")
    with op.batch_alter_table("bans") as batch:
        batch.drop_column("fleet_seq")
