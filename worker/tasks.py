"""The worker's one Celery task, thin: validate the payload (an experiment id), hand it to
worker.runner. Infrastructure errors before the claim are retried with backoff; a training failure
is a result, never a retry."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from farm.broker import RUN_TASK
from farm.db import DatabaseUnavailable

log = logging.getLogger(__name__)


def parse_experiment_id(payload: Any) -> int | None:
    if isinstance(payload, bool):
        return None
    if isinstance(payload, int):
        return payload if payload > 0 else None
    if isinstance(payload, str) and payload.strip().isdigit():
        return int(payload.strip()) or None
    return None


def run_experiment(self: Task[Any, Any], experiment_id: Any) -> str:
    from worker import lifecycle, runner

    exp_id = parse_experiment_id(experiment_id)
    if exp_id is None:
        log.error("dropping a message with an invalid experiment id: %r", experiment_id)
        return "invalid"
    try:
        status = runner.run_experiment(exp_id, lifecycle.context()).status
    except (OperationalError, DatabaseUnavailable) as exc:
        # the database is away: a job that ran has reported already or will be reaped;
        # a job not yet claimed is simply tried again later
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc
    if status == "declined":  # the worker is shutting down: a new message for another worker (a Celery Reject
        # did it too, with a traceback in the log that read like a crash); if this fails the reconciler publishes it
        from farm.recovery import publish_again

        try:
            publish_again(exp_id)
        except Exception as exc:  # noqa: BLE001 - the broker or the database away: the reconciler's job then
            log.warning("experiment %s: not published again (%s); the scheduler's reconciler will", exp_id, exc)
    return status


def register(app: Celery) -> None:
    app.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=8)(run_experiment)
