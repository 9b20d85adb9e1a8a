"""The worker's Celery app: `celery -A worker.app worker -Q <queue> --pool solo -c 1 -n <name>`
(`--pool threads -c 2` for a worker that starts its next job while one trains, see worker/gate.py).

Configuration is farm.broker's (JSON only, acks_late, prefetch 1, task_track_started, deliberate
task_reject_on_worker_lost=False, a visibility timeout longer than any job); per-job soft/hard time
limits travel on each message (farm.broker.publish_experiment). With `--pool solo` Celery does not
enforce time limits itself, so the runner's own wall-clock kill (budget + allowances) is the limit
that acts; the message limits sit above it for a prefork deployment.

`farm worker` (cli/worker.py) sets FARM_WORKER_* and execs this.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from farm.broker import make_celery
from worker import tasks

app = make_celery()
tasks.register(app)


def pool_slots(controller: Any) -> int | None:
    """The jobs Celery really runs at once: 1 in the solo pool, else its concurrency (None if unknown)."""
    pool = getattr(controller, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__name__", "") or ""
    if "solo" in name.lower():
        return 1
    concurrency = getattr(controller, "concurrency", None)
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else None


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from worker import lifecycle

    try:
        lifecycle.start(prepare=os.environ.get("FARM_WORKER_PREPARE", "1") != "0", slots=pool_slots(sender))
    except BaseException as exc:  # noqa: BLE001
        # Celery logs and swallows a signal handler's exception and starts consuming anyway: an
        # unregistered worker whose every job fails. Die before taking a message instead.
        print(f"farm worker: start-up failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)


def _on_worker_shutting_down(how: str = "Warm", **_: Any) -> None:
    from worker import lifecycle

    lifecycle.shutting_down(str(how))


def _on_worker_shutdown(**_: Any) -> None:
    from worker import lifecycle

    lifecycle.stop()


worker_init.connect(_on_worker_init, weak=False)
worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
worker_shutdown.connect(_on_worker_shutdown, weak=False)
