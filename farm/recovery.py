"""Recovery: the reaper and the broker reconciler, plain functions any service may call.

The database is the source of truth and a broker message only says "experiment N is queued", so
both recoveries are: fix the database under a row lock, commit, then publish. The scheduler loop
calls both periodically; every worker also runs the reaper in a thread, so a farm whose scheduler
is down still re-queues the jobs of a worker that died.

    from farm.recovery import reap_and_requeue, reconcile_broker
    reap_and_requeue()           # running + stale heartbeat -> queued (published) or lost
    reconcile_broker()           # queued in the database, no live message -> published again

Serverless transports (filesystem, SQLAlchemy) never redeliver a message whose worker was
SIGKILLed, and Redis only after the visibility timeout (hours): without the reaper such a job would
sit in `running` forever.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError

from farm import states
from farm.broker import get_celery, publish_experiment, queue_for
from farm.db import as_utc, db_now, session_scope
from farm.models import Experiment, ExperimentStatus, Program, Worker, utcnow
from farm.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Eval and compile time on top of the training budget; the training process's wall-clock limit is
# budget + startup allowance + this, the isolated evaluation's (worker/runner.py) startup allowance + this, and the
# Celery time limits sit above both.
EVAL_ALLOWANCE = 60.0


def job_time_limit(budget: float, settings: Settings | None = None) -> float:
    s = settings or get_settings()
    return float(budget) + 2 * (s.startup_allowance + EVAL_ALLOWANCE)


def _publish_all(jobs: Iterable[tuple[int, str, float]], app: Celery | None, settings: Settings) -> None:
    for exp_id, hw_class, budget in jobs:
        publish_experiment(exp_id, hw_class, time_limit=job_time_limit(budget, settings), app=app)


def publish_again(experiment_id: int, *, settings: Settings | None = None, app: Celery | None = None) -> None:
    """A new message for a queued experiment whose message a worker took and did not run (it was shutting down)."""
    s = settings or get_settings()
    with session_scope() as session:
        row = session.execute(select(Experiment.hw_class, Program.time_budget)
                              .join(Program, Program.id == Experiment.program_id)
                              .where(Experiment.id == experiment_id, Experiment.status == ExperimentStatus.queued)
                              ).first()
    if row is not None:
        _publish_all([(experiment_id, str(row[0]), float(row[1]))], app or get_celery(), s)


_last_db_failure: float | None = None  # monotonic time this process's reaper last failed to reach the database


def note_database_failure() -> None:
    """This process just failed to reach the database (its reaper's own write, say): reap nothing for the grace
    period after it (reap_and_requeue), since every heartbeat of the outage was missed too."""
    global _last_db_failure
    _last_db_failure = time.monotonic()


def _database_restarted_within(session: Any, seconds: float) -> bool:
    """Postgres only: did the server start less than `seconds` ago (heartbeats missed then were its fault)?"""
    if session.get_bind().dialect.name != "postgresql":
        return False
    up = session.execute(text("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")).scalar_one()
    return float(up) < seconds


def reap_and_requeue(*, settings: Settings | None = None, app: Celery | None = None,
                     interval: float | None = None,
                     max_retries: int | None = None) -> list[tuple[int, ExperimentStatus]]:
    """Re-queue (and re-publish) running experiments whose heartbeat is older than 2 x interval (2 x their worker's
    interval where that is longer: states.stale_after); those out of retries become `lost`. The retry history is
    kept in experiments.attempts.

    Not within that grace period of a database outage (this process failed to reach it, or Postgres started
    since), the longest any live worker asks for: every heartbeat missed during the outage would look like a dead
    worker, and reaping then re-queued (and so killed) every run in flight, each counting a retry. Live workers
    beat again within one interval; a dead one is reaped one grace period later."""
    s = settings or get_settings()
    every = interval or s.heartbeat_interval
    if _last_db_failure is not None and time.monotonic() - _last_db_failure < 2 * every:
        return []
    try:
        with session_scope() as session:
            grace = states.stale_after(every, session.execute(
                select(func.max(Worker.heartbeat_interval)).where(Worker.stopped_at.is_(None))).scalar())
            if ((_last_db_failure is not None and time.monotonic() - _last_db_failure < grace)
                    or _database_restarted_within(session, grace)):
                return []
            reaped = states.reap_stale(session, interval=every,
                                       max_retries=s.max_retries if max_retries is None else max_retries)
            requeued = [exp_id for exp_id, status in reaped if status == ExperimentStatus.queued]
            jobs = _job_rows(session, requeued)
    except DBAPIError:  # unreachable, refusing clients, a connection cut mid-transaction
        note_database_failure()
        raise
    # after commit: a worker that picks the message up must see the queued row
    _publish_all(jobs, app, s)
    for exp_id, status in reaped:
        log.warning("reaper: experiment %s had a stale heartbeat -> %s", exp_id, status.value)
    return reaped


def release_runs(worker_ids: set[str], *, reason: str, experiment_ids: set[int] | None = None,
                 stop_workers: bool = False, settings: Settings | None = None,
                 app: Celery | None = None) -> list[int]:
    """Put runs of these workers back in the queue without spending a retry (the worker was stopped: not the
    candidate's fault), with `reason` in experiments.attempts, and publish them after the commit. Only runs still
    `running` under one of the workers; `experiment_ids`: only those. Call only once their training processes are
    gone (a released run may start elsewhere at once). `stop_workers`: mark the workers stopped too. Returns the
    released experiment ids. `farm up` calls it for the workers it stopped, a worker for its own runs on SIGTERM."""
    if not worker_ids:
        return []
    s = settings or get_settings()
    jobs: list[tuple[int, str, float]] = []
    with session_scope() as session:
        now = db_now(session)
        stmt = select(Experiment).where(Experiment.status == ExperimentStatus.running,
                                        Experiment.worker_id.in_(sorted(worker_ids)))
        if experiment_ids is not None:
            stmt = stmt.where(Experiment.id.in_(sorted(experiment_ids)))
        rows = session.execute(stmt.order_by(Experiment.id).with_for_update()
                               .execution_options(populate_existing=True)).scalars().all()
        for exp in rows:
            exp.attempts = [*(exp.attempts or []), {
                "worker_id": exp.worker_id, "released_at": now.isoformat(), "progress": exp.progress,
                "reason": reason}]
            session.execute(update(Worker).where(Worker.id == exp.worker_id, Worker.current_experiment_id == exp.id)
                            .values(current_experiment_id=None))
            exp.status = ExperimentStatus.queued
            exp.worker_id = None
            exp.queued_at = now
            exp.progress = None
            exp.current_loss = None
        jobs = _job_rows(session, [exp.id for exp in rows])
        if stop_workers:
            session.execute(update(Worker).where(Worker.id.in_(sorted(worker_ids)))
                            .values(current_experiment_id=None, stopped_at=utcnow()))
    _publish_all(jobs, app, s)  # after the commit: a worker must find the row queued
    return sorted(j[0] for j in jobs)


def _job_rows(session: Any, ids: list[int]) -> list[tuple[int, str, float]]:
    if not ids:
        return []
    rows = session.execute(
        select(Experiment.id, Experiment.hw_class, Program.time_budget)
        .join(Program, Program.id == Experiment.program_id)
        .where(Experiment.id.in_(ids))).all()
    return [(int(r[0]), str(r[1]), float(r[2])) for r in rows]


# ---------------------------------------------------------------------------------------------
# Live messages: which experiment ids does the broker hold right now?
# ---------------------------------------------------------------------------------------------

def message_experiment_id(raw: str | bytes) -> int | None:
    """The experiment id of one serialized Celery message (kombu's JSON envelope), or None."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # Redis unacked entries: [message, exchange, routing_key]
            msg = msg[0]
            if isinstance(msg, str):
                msg = json.loads(msg)
        headers = msg.get("headers") or {}
        body = msg.get("body")
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body) if isinstance(body, (str, bytes)) else body
        args: Any = decoded[0] if isinstance(decoded, list) else (decoded or {}).get("args")
        if not args and headers.get("argsrepr"):
            args = json.loads(headers["argsrepr"].replace("(", "[").replace(")", "]").replace(",]", "]"))
        return int(args[0])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


UNACKED_FRESH = 60.0  # seconds a delivery not yet acknowledged counts as live (its worker claims within a second)


def _redis_live_ids(url: str, queues: set[str], unacked_fresh: float = UNACKED_FRESH) -> set[int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        live: set[int] = set()
        keys: list[str] = []
        for q in queues:
            # kombu keeps one list per priority step: "q", "q\x06\x163", "q\x06\x166", "q\x06\x169"
            keys += [q] + [f"{q}\x06\x16{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
        pipe = client.pipeline()
        for k in keys:
            pipe.lrange(k, 0, -1)
        # delivered to a worker, not yet acknowledged: live only if delivered lately (kombu's unacked_index holds each
        # delivery's time). Asked about queued rows only, so an older one was taken by a consumer that died before
        # its claim (SIGKILL, OOM, a retry's ETA message held through an outage): kombu gives it back only after
        # its 6-hour visibility timeout, and counted live it kept the experiment queued that long (found by review)
        pipe.zrangebyscore("unacked_index", time.time() - unacked_fresh, "+inf")
        pipe.hgetall("unacked")
        *lists, fresh, unacked = pipe.execute()
        fresh_tags = set(fresh)
        items = [raw for found in lists for raw in found]
        items += [raw for tag, raw in unacked.items() if tag in fresh_tags]
        for raw in items:
            exp_id = message_experiment_id(raw)
            if exp_id is not None:
                live.add(exp_id)
        return live
    finally:
        client.close()


def _filesystem_live_ids(broker_dir: Path) -> set[int]:
    live: set[int] = set()
    queue_dir = broker_dir / "queue"
    if not queue_dir.is_dir():
        return live
    for f in queue_dir.glob("*.msg"):
        try:
            exp_id = message_experiment_id(f.read_bytes())
        except OSError:  # consumed between listing and reading
            continue
        if exp_id is not None:
            live.add(exp_id)
    return live


def live_experiment_ids(settings: Settings, queues: set[str]) -> set[int] | None:
    """Experiment ids with a message waiting or in flight; None when the transport can't be read."""
    url = settings.broker
    if url.startswith(("redis://", "rediss://")):
        return _redis_live_ids(url, queues)
    if url.startswith("filesystem"):
        return _filesystem_live_ids(settings.broker_dir)
    return None


@dataclass
class ReconcileReport:
    queued: int = 0  # queued in the database
    live: int | None = None  # live messages found (None: transport not inspectable)
    republished: list[int] = field(default_factory=list)


def reconcile_broker(*, settings: Settings | None = None, app: Celery | None = None,
                     grace: float = 10.0) -> ReconcileReport:
    """Re-publish experiments queued in the database for longer than `grace` seconds (database
    clock) that have no live broker message, e.g. after Redis restarted empty. Where the transport
    can't be inspected every such experiment is re-published; duplicates are harmless because a
    worker's claim is a compare-and-set. The grace period covers the window between a commit and
    its publish, and between a worker taking a message and claiming the row."""
    s = settings or get_settings()
    with session_scope() as session:
        cutoff = db_now(session) - timedelta(seconds=grace)
        rows = session.execute(
            select(Experiment.id, Experiment.hw_class, Program.time_budget, Experiment.queued_at)
            .join(Program, Program.id == Experiment.program_id)
            # a paused program's queued runs are not started (farm/states.py claim): published again once resumed
            .where(Experiment.status == ExperimentStatus.queued, Program.status.not_in(states.HELD_PROGRAMS))
            .order_by(Experiment.id)).all()
    report = ReconcileReport(queued=len(rows))
    old = [(int(r[0]), str(r[1]), float(r[2])) for r in rows if r[3] is None or as_utc(r[3]) <= cutoff]
    if not old:
        return report
    live = live_experiment_ids(s, {queue_for(hw) for _, hw, _ in old})
    report.live = None if live is None else len(live)
    missing = [job for job in old if live is None or job[0] not in live]
    _publish_all(missing, app or get_celery(), s)
    report.republished = [job[0] for job in missing]
    if missing:
        log.warning("reconcile: re-published %d queued experiment(s) with no live message: %s",
                    len(missing), report.republished)
    return report
