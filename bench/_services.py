"""Shared by the benches: the private Postgres + Redis (scripts/services.sh) unless FARM_TEST_PG_URL /
FARM_TEST_REDIS_URL point at running ones, and a fresh migrated database per run."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k] = v
    return out


@contextmanager
def services() -> Iterator[tuple[str, str]]:
    """(postgres admin URL, redis URL); starts scripts/services.sh if none are given."""
    if os.environ.get("FARM_TEST_PG_URL") and os.environ.get("FARM_TEST_REDIS_URL"):
        yield os.environ["FARM_TEST_PG_URL"], os.environ["FARM_TEST_REDIS_URL"]
        return
    subprocess.run([str(ROOT / "scripts" / "services.sh"), "start"], check=True)
    try:
        env = _read_env(ROOT / ".build" / "services.env")
        os.environ.update(env)
        yield env["FARM_TEST_PG_URL"], env["FARM_TEST_REDIS_URL"]
    finally:
        subprocess.run([str(ROOT / "scripts" / "services.sh"), "stop"], check=False)


def fresh_database(admin_url: str, prefix: str = "bench") -> str:
    """CREATE DATABASE + Alembic upgrade; returns its URL."""
    import psycopg

    from farm import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    return url


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    from farm.db import dispose_engines

    dispose_engines()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"
