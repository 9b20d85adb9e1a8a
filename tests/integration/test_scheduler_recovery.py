"""The scheduler's recovery pass: with every worker gone (so no worker-side reaper runs), a tick
re-queues and re-publishes a running experiment whose heartbeat went stale, and re-publishes a
queued one whose broker message vanished."""

from __future__ import annotations

import redis
from sqlalchemy import text

from farm.db import session_scope
from farm.models import ExperimentStatus
from farm.recovery import live_experiment_ids
from farm.settings import get_settings, reset_settings_cache
from scheduler.loop import Scheduler
from tests.factories import make_experiment, make_program
from tests.toy_template import install
from tests.workerkit import rows

S = ExperimentStatus


def test_a_tick_reaps_a_stale_run_and_republishes_a_lost_message(pg_env, redis_url, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_HEARTBEAT_INTERVAL", "1")
    reset_settings_cache()
    with session_scope() as s:
        prog = make_program(s, time_budget=3.0)
        stale = make_experiment(s, prog, status=S.running, content_hash="a", worker_id=None)
        waiting = make_experiment(s, prog, status=S.queued, content_hash="b")
        s.flush()
        s.execute(text("UPDATE experiments SET heartbeat_at = clock_timestamp() - interval '1 minute', "
                       "started_at = clock_timestamp() - interval '1 minute' WHERE id = :i"), {"i": stale.id})
        s.execute(text("UPDATE experiments SET queued_at = clock_timestamp() - interval '1 minute' "
                       "WHERE id = :i"), {"i": waiting.id})
        ids = (stale.id, waiting.id)
    redis.Redis.from_url(redis_url).flushdb()  # no live message for either
    sched = Scheduler(publish=lambda *a, **kw: None)
    try:
        stats = sched.tick()
    finally:
        sched.close()
    exp = rows(type(stale), id=ids[0])[0]
    assert exp.status == S.queued and exp.retry_count == 1 and len(exp.attempts) == 1
    assert stats.get("reaped") == 1
    live = live_experiment_ids(get_settings(), {"cpu"})
    assert live is not None and set(ids) <= live  # both have a message again


def test_one_scheduler_per_postgres_database_and_the_lock_survives_a_lost_session(pg_env, tmp_path, monkeypatch):
    """Two schedulers with repositories of their own on one database: the second is refused with a line that says
    where the first one connects from. When the first one's session ends (a database restart, here its backend
    terminated), check() takes the lock again, or raises if another scheduler took it first."""
    import pytest

    from farm.db import SchedulerLockHeld, get_engine
    from farm.lineage import Lineage

    install(monkeypatch, tmp_path)
    reset_settings_cache()
    first = Scheduler(publish=lambda *a, **kw: None)
    second = Scheduler(publish=lambda *a, **kw: None, lineage=Lineage(tmp_path / "other-box.git"))
    first.start()
    try:
        with pytest.raises(SchedulerLockHeld, match=r"another scheduler is running .*backend pid \d+"):
            second.start()

        def kill_lock_session() -> None:
            with get_engine().connect() as conn:
                pid = conn.execute(text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")).scalar()
                assert pid is not None
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})

        kill_lock_session()
        first.db_lock.check(every=0)  # its session is gone: taken again
        first.tick()
        with pytest.raises(SchedulerLockHeld):
            second.start()
        kill_lock_session()
        second.start()  # took it while the first one had lost it
        with pytest.raises(SchedulerLockHeld):
            first.db_lock.check(every=0)
        # and goes on refusing, every pass (found by review: after one refusal check() passed silently, and the
        # first scheduler went on working without the lock beside the second)
        with pytest.raises(SchedulerLockHeld):
            first.tick()
        with pytest.raises(SchedulerLockHeld):
            first.db_lock.check()
        second.close()
        assert first.db_lock.check() is True  # free again: taken back at the next check
        first.tick()
    finally:
        second.close()
        first.close()


def test_a_pass_after_the_lock_session_was_lost_does_not_reap_runs_whose_beats_the_outage_stopped(
        pg_env, redis_url, tmp_path, monkeypatch):
    """Found by review: a database outage that is not a Postgres restart (a network cut, a failover) made check()
    raise on every pass, before the reaper, so nothing noted the outage; when the database came back the first
    pass took the lock again and reaped every run in flight (their heartbeats had failed all along), each counting
    a retry. Taking the lock back now starts the reaper's grace, as the reaper's own failures do."""
    from farm import recovery
    from farm.db import get_engine

    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setattr(recovery, "_last_db_failure", None)  # restored after the test: no grace leaks out
    reset_settings_cache()
    with session_scope() as s:
        prog = make_program(s, time_budget=3.0)
        live = make_experiment(s, prog, status=S.running, content_hash="a", worker_id=None)
        s.flush()
        s.execute(text("UPDATE experiments SET heartbeat_at = clock_timestamp() - interval '1 minute', "
                       "started_at = clock_timestamp() - interval '2 minutes' WHERE id = :i"), {"i": live.id})
        live_id = live.id
    redis.Redis.from_url(redis_url).flushdb()
    sched = Scheduler(publish=lambda *a, **kw: None)
    sched.start()
    try:
        with get_engine().connect() as conn:  # the lock's session ends, the postmaster stays up
            pid = conn.execute(text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")).scalar()
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        sched.db_lock._checked = 0.0  # the next pass checks the lock now, not 30 s on
        stats = sched.tick()
        assert not stats.get("reaped")
        assert rows(type(live), id=live_id)[0].status == S.running
        recovery._last_db_failure = None  # the grace is over and the worker never beat again: a dead worker
        assert sched.tick().get("reaped") == 1
    finally:
        sched.close()
    exp = rows(type(live), id=live_id)[0]
    assert exp.status == S.queued and exp.retry_count == 1


def test_a_delivery_a_dead_consumer_never_acknowledged_does_not_keep_its_experiment_queued(pg_env, redis_url, tmp_path):
    """Found by review: every entry of Redis's `unacked` hash counted as a live message, also the delivery of a worker
    SIGKILLed before its claim; kombu gives such an entry back only after its 6-hour visibility timeout, so the
    experiment stayed queued, with no message, for 6 hours. A fresh delivery still counts (its worker is claiming)."""
    import subprocess
    import sys
    import time
    from datetime import timedelta

    from sqlalchemy import update

    from farm.broker import publish_experiment
    from farm.db import db_now
    from farm.models import Experiment
    from farm.recovery import reconcile_broker

    redis.Redis.from_url(redis_url).flushdb()
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s), status=S.queued).id
    publish_experiment(exp_id, "cpu")
    taker = ("import os\nfrom farm.broker import get_celery\n"
             "with get_celery().connection_for_read() as conn:\n"
             "    assert conn.default_channel.basic_get('cpu', no_ack=False) is not None\n"
             "    os._exit(137)\n")  # taken (acks_late), then killed before any claim
    subprocess.run([sys.executable, "-c", taker], check=False, timeout=60)
    client = redis.Redis.from_url(redis_url)
    assert client.llen("cpu") == 0 and client.hlen("unacked") == 1
    with session_scope() as s:
        s.execute(update(Experiment).where(Experiment.id == exp_id).values(queued_at=db_now(s) - timedelta(minutes=5)))
    assert reconcile_broker().republished == []  # delivered a moment ago: its worker may be claiming it now
    tag = client.zrange("unacked_index", 0, -1)[0]
    client.zadd("unacked_index", {tag: time.time() - 120})  # two minutes on, still not acknowledged
    assert reconcile_broker().republished == [exp_id]
    assert client.llen("cpu") == 1
