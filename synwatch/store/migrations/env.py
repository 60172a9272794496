"""Alembic environment for synwatch's store. Run through synwatch.store.migrate(), which hands
over an open connection; batch mode because SQLite cannot ALTER most things in place."""

from __future__ import annotations

from alembic import context

from synwatch.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic revision --autogenerate` by developers
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    connection = engine.connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
