"""Shared fixtures: real Postgres and Redis started by `make test` (scripts/services.sh).

A test that asks for `pg_url` gets a fresh database cloned from a migrated template (fast:
CREATE DATABASE ... TEMPLATE). Without the services a test that needs them FAILS, never skips:
run the suite through `make test`.
"""

from __future__ import annotations

import os

# Before anything imports triton: the kernel tests run Triton's interpreter in this process
# (tests/unit/kernels/conftest.py explains why the order matters). One process cannot also compile them
# for CUDA, so tests/gpu runs in a pytest process of its own with FARM_TEST_CUDA=1 (scripts/test.sh).
if os.environ.get("FARM_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent


def _need(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set: run the suite with `make test`, which starts Postgres and Redis")
    return value


def _admin_conn():  # type: ignore[no-untyped-def]
    import psycopg

    url = _need("FARM_TEST_PG_URL").replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    from farm import migrate

    name = f"farm_tpl_{os.getpid()}"
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = _need("FARM_TEST_PG_URL").rsplit("/", 1)[0]
    migrate.upgrade(f"{base}/{name}")
    yield name
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_db(template: str | None) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name


def _drop_db(name: str) -> None:
    from farm.db import dispose_engines

    dispose_engines()
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated Postgres database for this test."""
    name = _fresh_db(pg_template)
    yield _need("FARM_TEST_PG_URL").rsplit("/", 1)[0] + "/" + name
    _drop_db(name)


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """A fresh, empty (unmigrated) Postgres database."""
    name = _fresh_db(None)
    yield _need("FARM_TEST_PG_URL").rsplit("/", 1)[0] + "/" + name
    _drop_db(name)


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    url = _need("FARM_TEST_REDIS_URL")
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from farm import migrate

    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def farm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A private farm home; the database/broker URLs are filled in by the fixtures that use it."""
    from farm.db import dispose_engines
    from farm.settings import reset_settings_cache

    home = tmp_path / "home"
    home.mkdir()
    env = {"FARM_HOME": str(home), "FARM_ENV": "development"}
    for k in list(os.environ):
        if k.startswith("FARM_") and not k.startswith("FARM_TEST_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings_cache()
    dispose_engines()
    yield env
    reset_settings_cache()
    dispose_engines()


@pytest.fixture
def pg_env(farm_env: dict[str, str], pg_url: str, redis_url: str,
           monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Farm settings pointing at a fresh Postgres database and the test Redis."""
    from farm.settings import reset_settings_cache

    farm_env.update(FARM_DATABASE_URL=pg_url, FARM_BROKER_URL=redis_url)
    monkeypatch.setenv("FARM_DATABASE_URL", pg_url)
    monkeypatch.setenv("FARM_BROKER_URL", redis_url)
    reset_settings_cache()
    return farm_env


def restart_postgres(down_seconds: float = 0.0) -> None:
    """Restart the test Postgres server in place (fault tests); with down_seconds, it stays stopped that long."""
    data = _need("FARM_TEST_PG_DATA")
    pgbin = _need("FARM_TEST_PG_BIN")
    cmd = f"'{pgbin}/pg_ctl' -D '{data}' -w -t 60 -m fast restart >/dev/null"
    if down_seconds > 0:  # stop + start: `start` needs the options `restart` would reuse (port, socket dir, ...)
        argv = shlex.split(Path(data, "postmaster.opts").read_text())[1:]
        opts = [a for i, a in enumerate(argv) if a != "-D" and (i == 0 or argv[i - 1] != "-D")]
        ctl = f"'{pgbin}/pg_ctl' -D '{data}' -w -t 60"
        cmd = (f"{ctl} -m fast stop >/dev/null && sleep {down_seconds:g} && "
               f"{ctl} -l '{data}/server.log' -o {shlex.quote(shlex.join(opts))} start >/dev/null")
    if os.getuid() == 0:
        subprocess.run(["su", "postgres", "-s", "/bin/bash", "-c", cmd], check=True)
    else:
        subprocess.run(["bash", "-c", cmd], check=True)
