"""every row carries the node that wrote it (storage.host): a fleet shares one history

- events, bans and action runs get ``host``; old rows take their incident's host, else the
  node that runs this migration (``storage.host``, handed over by Store.migrate);
- an event's ``dedup_key`` is unique per host, not overall: two nodes on one machine read the
  same journal entries and must each record them; one node's events are indexed by when they
  happened (`events list` of this host);
- source positions and saved kernel settings are per host (their primary keys gain ``host``);
- bans get ``scope`` ("local" | "fleet") and ``origin_id``: a fleet ban decided on one node is
  copied by every other node, each copy naming the ban it copies;
- ``nodes``: each node's heartbeat, for `synwatch status` ("which hosts it has heard from").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import socket

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STAMP = sa.DateTime(timezone=True)


def _node() -> str:
    cfg = op.get_context().config
    return str((cfg.attributes.get("host") if cfg is not None else None)
               or socket.gethostname())


def _positions() -> list[sa.Column[object]]:
    return [sa.Column("source", sa.String(512), nullable=False),
            sa.Column("position", sa.JSON, nullable=False),
            sa.Column("updated_at", STAMP, nullable=False)]


def _settings() -> list[sa.Column[object]]:
    return [sa.Column("netns", sa.String(255), nullable=False),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("value", sa.String(255), nullable=False),
            sa.Column("saved_at", STAMP, nullable=False)]


def _rekey(table: str, columns: list[sa.Column[object]], key: list[str], *,
           with_host: bool) -> None:
    """Recreate ``table`` with (``with_host``) or without ``host`` first in its primary key
    (SQLite cannot alter a primary key in place; a copy is the same on both databases). Without
    it, only this node's rows are kept."""
    names = ", ".join(c.name for c in columns)
    host = [sa.Column("host", sa.String(255), nullable=False)] if with_host else []
    op.create_table(f"{table}_new", *host, *columns,
                    sa.PrimaryKeyConstraint(*(["host"] if with_host else []), *key))
    copy = (f"INSERT INTO {table}_new (host, {names}) SELECT :host, {names} FROM {table}"
            if with_host else
            f"INSERT INTO {table}_new ({names}) SELECT {names} FROM {table} WHERE host = :host")
    op.get_bind().execute(sa.text(copy), {"host": _node()})
    op.drop_table(table)
    op.rename_table(f"{table}_new", table)


def upgrade() -> None:
    bind = op.get_bind()
    node = {"host": _node()}
    of_incident = "(SELECT i.host FROM incidents i WHERE i.id = {0}.incident_id)"
    # events: the host column held the log line's hostname; it now names the recording node
    bind.execute(sa.text(f"UPDATE events SET host = coalesce({of_incident.format('events')}, "
                         "host, :host)"), node)
    if bind.dialect.name == "sqlite":
        # the unique constraint of 0001 has no name in SQLite; the convention names it. The
        # batch copies the table, and reflection cannot copy an index on an expression.
        op.drop_index("ix_events_when", table_name="events")
        with op.batch_alter_table("events", naming_convention={
                "uq": "uq_%(table_name)s_%(column_0_name)s"}) as batch:
            batch.drop_constraint("uq_events_dedup_key", type_="unique")
        op.create_index("ix_events_when", "events",
                        [sa.text("coalesce(time, recorded_at)"), "id"])
    else:
        op.drop_constraint("events_dedup_key_key", "events", type_="unique")
    op.create_index("ux_events_host_dedup", "events", ["host", "dedup_key"], unique=True)
    # one node's events by when they happened: `events list` of this host, newest first
    op.create_index("ix_events_host_when", "events",
                    ["host", sa.text("coalesce(time, recorded_at)"), "id"])
    op.create_index("ix_incidents_host_opened", "incidents", ["host", "opened_at"])

    for table in ("bans", "action_runs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("host", sa.String(255), nullable=True))
        bind.execute(sa.text(f"UPDATE {table} SET host = "
                             f"coalesce({of_incident.format(table)}, :host)"), node)
    with op.batch_alter_table("bans") as batch:
        batch.alter_column("host", existing_type=sa.String(255), nullable=False)
        batch.add_column(sa.Column("scope", sa.String(8), nullable=False,
                                   server_default="local"))
        batch.add_column(sa.Column("origin_id", sa.Integer, nullable=True))
    op.create_index("ix_bans_host_netns", "bans", ["host", "netns", "removed_at"])
    op.create_index("ix_bans_origin", "bans", ["origin_id"])

    _rekey("source_positions", _positions(), ["source"], with_host=True)
    _rekey("saved_settings", _settings(), ["netns", "name"], with_host=True)
    op.create_table("nodes",
                    sa.Column("host", sa.String(255), primary_key=True),
                    sa.Column("pid", sa.Integer, nullable=True),
                    sa.Column("started_at", STAMP, nullable=False),
                    sa.Column("seen_at", STAMP, nullable=False),
                    sa.Column("version", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_table("nodes")
    _rekey("saved_settings", _settings(), ["netns", "name"], with_host=False)
    _rekey("source_positions", _positions(), ["source"], with_host=False)
    op.drop_index("ix_bans_origin", table_name="bans")
    op.drop_index("ix_bans_host_netns", table_name="bans")
    with op.batch_alter_table("bans") as batch:
        batch.drop_column("origin_id")
        batch.drop_column("scope")
        batch.drop_column("host")
    with op.batch_alter_table("action_runs") as batch:
        batch.drop_column("host")
    op.drop_index("ix_incidents_host_opened", table_name="incidents")
    op.drop_index("ix_events_host_when", table_name="events")
    op.drop_index("ux_events_host_dedup", table_name="events")
    op.drop_index("ix_events_when", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.create_unique_constraint("uq_events_dedup_key", ["dedup_key"])
    op.create_index("ix_events_when", "events", [sa.text("coalesce(time, recorded_at)"), "id"])
