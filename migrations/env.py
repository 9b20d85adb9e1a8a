"""Alembic environment: the shared metadata from farm.models and the URL from farm settings.

A caller may pass a URL explicitly through `config.attributes["url"]` (farm.migrate does, and the
tests do); otherwise FARM_DATABASE_URL (or the embedded SQLite default) is used.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from farm.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return str(url)
    from farm.settings import get_settings

    return get_settings().db_url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    from farm.db import make_engine

    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: Any) -> None:
    # SQLite: a batch migration that changes a constraint recreates the table (copy, drop the old one, rename), and
    # with foreign keys on, dropping the old `experiments` deleted every result and decision through ON DELETE
    # CASCADE (0006 did, found by its test). Off for the migration, as Alembic's batch docs advise, on again after,
    # with the database checked. The pragma is a no-op inside a transaction: it goes to the driver's connection
    # (autocommit, farm/db.py) before the migration's transaction begins.
    raw = connection.connection.driver_connection if connection.dialect.name == "sqlite" else None
    if raw is not None and connection.in_transaction():
        raise RuntimeError("a SQLite migration needs a connection outside a transaction (foreign keys go off)")
    if raw is not None:
        raw.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        if raw is not None:
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows that break foreign keys: {broken[:5]}")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_offline()
else:
    run_online()
