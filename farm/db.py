"""Engines and sessions: one `session_scope()` that commits, rolls back and closes.

SQLite (the embedded default) runs in WAL mode with a busy timeout so the API, the scheduler and
the workers can share one file; Postgres is reached through psycopg 3.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from farm.models import utcnow
from farm.settings import Settings, get_settings, mask_url


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached; the message names the (masked) URL."""


_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE: take the write lock at the start of every transaction, so a
    # read-then-write (compare-and-set) cannot be interleaved with another writer.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: Any) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)

        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves

        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, connect_args={"connect_timeout": 10}, **kwargs)


def get_engine(settings: Settings | None = None) -> Engine:
    url = (settings or get_settings()).db_url
    with _lock:
        eng = _engines.get(url)
        if eng is None:
            eng = _engines[url] = make_engine(url)
        return eng


def dispose_engines() -> None:
    """Drop pooled connections (after fork, or in tests that restart the database)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


_factories: dict[int, sessionmaker[Session]] = {}


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    eng = engine or get_engine()
    fac = _factories.get(id(eng))
    if fac is None:
        fac = _factories[id(eng)] = sessionmaker(bind=eng, expire_on_commit=False)
    return fac


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def db_now(session: Session) -> datetime:
    """The database server's current time (UTC, aware). Use it for every staleness decision."""
    value = session.execute(select(utcnow())).scalar_one()
    if isinstance(value, str):  # SQLite returns text for a bare expression
        value = datetime.fromisoformat(value)
    return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes (stored as UTC); Postgres gives aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def check_connection(engine: Engine | None = None) -> None:
    """Raise DatabaseUnavailable with one clear line (password masked) if the database is unreachable."""
    eng = engine or get_engine()
    try:
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise DatabaseUnavailable(
            f"cannot reach the database at {mask_url(eng.url.render_as_string(hide_password=False))}: {reason}"
        ) from None


def is_postgres(engine_or_session: Engine | Session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"
