"""An idle worker stays live for the scheduler: its row's heartbeat is refreshed between jobs, so
the scheduler (which sizes the queue by live workers) keeps feeding it. With FARM_LOOKAHEAD=0 a
farm of idle workers whose rows had gone stale was never fed again."""

from __future__ import annotations

import time

from farm.db import db_now, session_scope
from farm.models import Worker
from tests.workerkit import worker_env, workers


def test_an_idle_worker_keeps_a_fresh_heartbeat(pg_env, tmp_path):
    with workers(worker_env(pg_env), ["idle:cpu0"], tmp_path / "logs"):
        time.sleep(4.0)  # no job at all: four heartbeat intervals (stale after two)
        with session_scope() as s:
            age = (db_now(s) - s.get(Worker, "idle:cpu0").last_heartbeat).total_seconds()
    assert age < 2.0, f"idle worker's heartbeat is {age:.1f}s old"
