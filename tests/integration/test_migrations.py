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
    assert migrate.current(url) == "0008"
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


def _rows_survive_0006(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """0006 replaces a CHECK constraint of experiments and results: SQLite's batch mode recreates both tables, and
    with foreign keys on, dropping the old experiments table deleted every result (ON DELETE CASCADE). A cancelled
    run becomes invalid on the way down."""
    import sqlalchemy as sa

    from farm.db import session_scope
    from farm.models import ExperimentStatus, Result
    from farm.settings import reset_settings_cache
    from tests.factories import make_experiment, make_program, make_worker

    migrate.upgrade(url)  # written through the ORM, whose columns are head's, then taken down to 0005 with them
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    reset_settings_cache()
    engine = make_engine(url)
    with session_scope(engine) as s:
        p = make_program(s)
        make_worker(s, "w1")
        done = make_experiment(s, p, status=ExperimentStatus.succeeded)
        make_experiment(s, p, status=ExperimentStatus.running, worker_id="w1")
        s.add(Result(experiment_id=done.id, outcome=ExperimentStatus.succeeded, val_bpb=1.25))
    engine.dispose()

    def counts() -> tuple[int, int, list[str | None], int]:
        eng = make_engine(url)
        try:
            with eng.connect() as conn:
                return (conn.execute(sa.text("SELECT count(*) FROM results")).scalar_one(),
                        conn.execute(sa.text("SELECT count(*) FROM experiments")).scalar_one(),
                        list(conn.execute(sa.text("SELECT worker_id FROM experiments ORDER BY id")).scalars()),
                        conn.execute(sa.text("SELECT count(*) FROM experiments WHERE status = 'cancelled'"))
                        .scalar_one())
        finally:
            eng.dispose()

    migrate.downgrade(url, "0005")
    assert counts() == (1, 2, [None, "w1"], 0)
    migrate.upgrade(url)
    assert counts() == (1, 2, [None, "w1"], 0)
    eng = make_engine(url)
    with eng.begin() as conn:  # the new status is accepted by the database's constraint
        conn.execute(sa.text("UPDATE experiments SET status = 'cancelled' WHERE status = 'succeeded'"))
    eng.dispose()
    assert counts() == (1, 2, [None, "w1"], 1)
    migrate.downgrade(url, "0005")
    assert counts() == (1, 2, [None, "w1"], 0)
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT status FROM experiments ORDER BY id")).scalars().all() == [
                "invalid", "running"]
        with pytest.raises(sa.exc.IntegrityError), eng.begin() as conn:
            conn.execute(sa.text("UPDATE experiments SET status = 'cancelled'"))
    finally:
        eng.dispose()


def test_sqlite_0006_keeps_every_row(tmp_path, monkeypatch):
    _rows_survive_0006(f"sqlite:///{tmp_path / 'm.db'}", monkeypatch)


def test_postgres_0006_keeps_every_row(pg_empty_url, monkeypatch):
    _rows_survive_0006(pg_empty_url, monkeypatch)
