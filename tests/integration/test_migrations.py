"""Migrations: upgrade empty Postgres and SQLite to head, down to base and up again, and the
models agree with the migrated schema (autogenerate finds no difference)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from farm import migrate
from farm.db import make_engine
from farm.models import Base

TABLES = {"programs", "experiments", "results", "workers", "decisions", "llm_calls", "api_tokens"}


def _roundtrip(url: str) -> None:
    migrate.upgrade(url)
    assert migrate.current(url) == "0005"
    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    engine = make_engine(url)
    assert not (set(inspect(engine).get_table_names()) & TABLES)
    engine.dispose()
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_postgres_roundtrip_and_no_drift(pg_empty_url):
    _roundtrip(pg_empty_url)


def test_sqlite_roundtrip_and_no_drift(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgres_check_constraints_reject_bad_enum(pg_url):
    import sqlalchemy as sa

    engine = make_engine(pg_url)
    try:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO programs (name, slug, instructions, template, editable_files, profile, hw_class,"
                " time_budget, proposer, policy, stop_rules, weight, status, branch)"
                " VALUES ('p','p','x','default','[]','cpu','cpu',10,'{}','{}','{}',1,'exploded','b')"))
    finally:
        engine.dispose()
