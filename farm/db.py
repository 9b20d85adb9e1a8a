"""Engines and sessions: one `session_scope()` that commits, rolls back and closes.

SQLite (the embedded default) runs in WAL mode with a busy timeout so the API, the scheduler and
the workers can share one file; Postgres is reached through psycopg 3.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from farm.models import utcnow
from farm.settings import Settings, get_settings, mask_url


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached; the message names the (masked) URL."""


class DatabaseNotMigrated(DatabaseUnavailable):
    """The database is reachable but the migrations have not created (or not updated) its tables."""


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


UPGRADE_HINT = "run `farm db upgrade` (or `farm up`, which migrates first)"


def _sqlite_file(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def check_migrated(engine: Engine | None = None) -> None:
    """`check_connection`, then refuse a database the migrations have not brought to the latest revision,
    with one line that says how to migrate it (a command that reads tables must not die on "no such table").

    A missing SQLite file is reported without connecting, because connecting would create an empty one."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from farm.migrate import alembic_config

    url = engine.url.render_as_string(hide_password=False) if engine is not None else get_settings().db_url
    where = f"the database at {mask_url(url)}"
    path = _sqlite_file(url)
    if path is not None and not path.is_file():
        raise DatabaseNotMigrated(f"{where} is not migrated (the file does not exist yet): {UPGRADE_HINT}")
    eng = engine or get_engine()
    check_connection(eng)
    with eng.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    script = ScriptDirectory.from_config(alembic_config(url))
    if current is None:
        raise DatabaseNotMigrated(f"{where} is not migrated: {UPGRADE_HINT}")
    heads = script.get_heads()
    # a revision this code does not know is a newer farm's database: left to the code that reads it
    if current not in heads and current in {rev.revision for rev in script.walk_revisions()}:
        raise DatabaseNotMigrated(f"{where} is at revision {current}, not the latest ({', '.join(heads)}): "
                                  f"{UPGRADE_HINT}")


def is_postgres(engine_or_session: Engine | Session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


# one scheduler per database: the key of its session-level advisory lock on Postgres ("RFSCHED1")
SCHEDULER_LOCK_KEY = 0x5246534348454431


class SchedulerLockHeld(RuntimeError):
    """Another scheduler is running on this database."""


class SchedulerLock:
    """One scheduler per farm database, whatever host it runs on. The repository lock beside the scheduler's git
    repository only covers schedulers that share that folder: a second one started elsewhere against the same
    database (`farm up` on a worker box pointed at the head's Postgres) would decide the same experiments and mark
    the first one's candidates invalid, their parents missing from its own repository.

    Postgres: a session-level advisory lock, held on a connection of its own for the scheduler's life; a database
    restart ends that session and frees the lock, so `check()` (every pass) takes it again, or raises if another
    scheduler took it meanwhile. SQLite (one host): a file lock beside the database file."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self._fd: int | None = None
        self._checked = 0.0
        self._lost = False  # held, then lost with its session: every check() tries to take it again until it does

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fd is not None

    def _where(self) -> str:
        return mask_url(self.engine.url.render_as_string(hide_password=False))

    def acquire(self) -> None:
        if self.held:
            return
        if is_postgres(self.engine):
            self._acquire_postgres()
            return
        path = _sqlite_file(self.engine.url.render_as_string(hide_password=False))
        if path is None:  # an in-memory database belongs to this process alone
            return
        fd = os.open(f"{path}.scheduler-lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SchedulerLockHeld(f"another scheduler is running on the database at {self._where()} "
                                    f"(one scheduler per farm)") from None
        self._fd = fd

    def _acquire_postgres(self) -> None:
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": SCHEDULER_LOCK_KEY}).scalar())
            holder = "" if got else self._holder(conn)
            conn.commit()
        except BaseException:
            conn.invalidate()  # never back to the pool with the lock possibly held
            conn.close()
            raise
        if not got:
            conn.close()
            raise SchedulerLockHeld(f"another scheduler is running on the database at {self._where()}{holder} "
                                    f"(one scheduler per farm: stop it, or point this one at another database)")
        self._conn = conn
        self._checked = time.monotonic()
        self._lost = False

    @staticmethod
    def _holder(conn: Connection) -> str:
        """Where the holder connects from, if this role may see it (a hint for the message, nothing more)."""
        try:
            row = conn.execute(text(
                "SELECT a.pid, host(a.client_addr), a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = CAST(:c AS oid) "
                "AND l.objid = CAST(:o AS oid) AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"),
                {"c": SCHEDULER_LOCK_KEY >> 32, "o": SCHEDULER_LOCK_KEY & 0xFFFFFFFF}).first()
        except DBAPIError:
            conn.rollback()
            return ""
        if row is None:
            return ""
        since = row[2].isoformat(timespec="seconds") if row[2] else "?"
        return f" (its connection: backend pid {row[0]}, from {row[1] or 'a local socket'}, since {since})"

    def check(self, every: float = 30.0) -> bool:
        """Still held? At most every `every` seconds, a round trip on the lock's connection. A lost connection (the
        database restarted) takes the lock again, or raises: SchedulerLockHeld if another scheduler has it now, the
        database's error if it is still down. Once lost, every call tries again until it is taken back, so a caller
        that does its work only after check() never works without it. True when it was taken back just now (what
        the caller learned from the database meanwhile may be stale)."""
        if self._lost:
            self._acquire_postgres()
            return True
        if self._conn is None or time.monotonic() - self._checked < every:
            return False
        self._checked = time.monotonic()
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return False
        except DBAPIError:
            self._drop()
            self._lost = True
        self._acquire_postgres()
        return True

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.invalidate()
            self._conn.close()
            self._conn = None

    def release(self) -> None:
        self._lost = False
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEDULER_LOCK_KEY})
                self._conn.commit()
                self._conn.close()
                self._conn = None
            except DBAPIError:
                self._drop()  # closing the session for good frees the lock
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
