"""The Celery app every service shares, and the one way to publish an experiment.

Postgres (or the embedded SQLite) is the source of truth; a broker message only says "experiment
N is queued". Messages carry nothing but the id (JSON), so losing or duplicating one is harmless:
the scheduler re-publishes queued experiments that have no live message, and a worker's claim is
a compare-and-set, so a duplicate delivery runs nothing.

With no FARM_BROKER_URL the filesystem transport under the farm home is used: real Celery, real
worker processes, no server to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from farm.settings import Settings, get_settings

RUN_TASK = "worker.run_experiment"
MAINTENANCE_QUEUE = "farm.maintenance"


def queue_for(hw_class: str) -> str:
    """Queue name of a hardware class: `cpu`, `gpu.h100`, `gpu.a100`, ..."""
    return hw_class


def filesystem_options(broker_dir: Path) -> dict[str, Any]:
    queue_dir = broker_dir / "queue"
    for d in (queue_dir, broker_dir / "processed", broker_dir / "control"):
        d.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(broker_dir / "processed"),
        "store_processed": False,
        "control_folder": str(broker_dir / "control"),
    }


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("researchfarm", broker=s.broker, set_as_current=False)
    transport: dict[str, Any] = {}
    if s.broker.startswith("filesystem"):
        transport = filesystem_options(s.broker_dir)
    else:
        # longer than the longest job, so Redis never redelivers a task that is still running;
        # a worker that died is found sooner by the database-side reaper (farm.states.reap_stale)
        transport = {"visibility_timeout": 6 * 3600}
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # outcomes go to the database, never to a result backend
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        # False, deliberately: a job whose worker process died is re-queued by the database reaper,
        # which counts retries; a broker-level redelivery would loop a candidate that kills its worker
        task_reject_on_worker_lost=False,
        task_default_queue="cpu",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


_apps: dict[tuple[str, str], Celery] = {}


def get_celery() -> Celery:
    """The shared app for the current settings (one per broker: settings may change in a process,
    and a message must never go to the broker of an earlier configuration)."""
    s = get_settings()
    key = (s.broker, str(s.broker_dir))
    app = _apps.get(key)
    if app is None:
        app = _apps[key] = make_celery(s)
    return app


def reset_celery() -> None:
    _apps.clear()


def publish_experiment(experiment_id: int, hw_class: str, *, time_limit: float | None = None,
                       app: Celery | None = None) -> None:
    """Send one experiment id to its class's queue. Call only after the queued state is committed."""
    kwargs: dict[str, Any] = {}
    if time_limit:
        kwargs.update(time_limit=int(time_limit) + 60, soft_time_limit=int(time_limit) + 30)
    (app or get_celery()).send_task(RUN_TASK, args=[int(experiment_id)], queue=queue_for(hw_class),
                                    **kwargs)
