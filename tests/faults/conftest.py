"""A farm per fault test: the test Postgres (fresh database), a private Redis, the fault harness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.settings import reset_settings_cache
from tests.faults.farmkit import FARM_ENV, FaultFarm
from tests.procs import free_port, start_redis, stop_redis


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    (tmp_path / "redis").mkdir()
    start_redis(port, tmp_path / "redis")
    yield port
    stop_redis(port)


@pytest.fixture
def farm(pg_env: dict[str, str], redis_port: int, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultFarm]:
    env = dict(pg_env, FARM_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0", **FARM_ENV)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings_cache()
    f = FaultFarm(env=env, logs=tmp_path / "logs")
    try:
        yield f
    finally:
        f.stop()
