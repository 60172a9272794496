"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 05:54:48.131898
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("netns", sa.String(length=255), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("family", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_evidence_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("peak_syn_recv", sa.Integer(), nullable=False),
        sa.Column("top_prefixes", sa.JSON(), nullable=False),
        sa.Column("recommendations", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.create_index("ix_incidents_listener", ["netns", "port", "status"], unique=False)
        batch_op.create_index("ix_incidents_opened", ["opened_at"], unique=False)

    op.create_table(
        "source_positions",
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("position", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("source"),
    )
    op.create_table(
        "action_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rendered", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_action_runs_incident_id"), ["incident_id"], unique=False
        )

    op.create_table(
        "bans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("netns", sa.String(length=255), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("times_banned", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("bans", schema=None) as batch_op:
        batch_op.create_index("ix_bans_expires", ["expires_at"], unique=False)
        batch_op.create_index("ix_bans_prefix", ["prefix"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("historical", sa.Boolean(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("family", sa.Integer(), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=True),
        sa.Column("source_ip", sa.String(length=64), nullable=True),
        sa.Column("source_port", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("pattern", sa.String(length=128), nullable=False),
        sa.Column("dedup_key", sa.String(length=255), nullable=True),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dedup_key"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_port", ["port"], unique=False)
        batch_op.create_index("ix_events_time", ["time"], unique=False)

    op.create_table(
        "evidence_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("syn_recv", sa.Integer(), nullable=True),
        sa.Column("accept_queue", sa.Integer(), nullable=True),
        sa.Column("backlog", sa.Integer(), nullable=True),
        sa.Column("rates", sa.JSON(), nullable=False),
        sa.Column("top_prefixes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evidence_samples", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_evidence_samples_incident_id"), ["incident_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("evidence_samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evidence_samples_incident_id"))

    op.drop_table("evidence_samples")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_time")
        batch_op.drop_index("ix_events_port")

    op.drop_table("events")
    with op.batch_alter_table("bans", schema=None) as batch_op:
        batch_op.drop_index("ix_bans_prefix")
        batch_op.drop_index("ix_bans_expires")

    op.drop_table("bans")
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_action_runs_incident_id"))

    op.drop_table("action_runs")
    op.drop_table("source_positions")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index("ix_incidents_opened")
        batch_op.drop_index("ix_incidents_listener")

    op.drop_table("incidents")
