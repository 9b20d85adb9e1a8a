"""reconcile_broker and reap_and_requeue on the embedded default (SQLite + filesystem transport)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from farm.broker import make_celery, publish_experiment
from farm.db import db_now, session_scope
from farm.models import Experiment, ExperimentStatus
from farm.recovery import _filesystem_live_ids, reap_and_requeue, reconcile_broker
from farm.settings import get_settings
from tests.factories import make_experiment, make_program

S = ExperimentStatus


def test_reconcile_republishes_only_queued_experiments_without_a_live_message(farm_env, monkeypatch):
    from farm import migrate

    migrate.upgrade(get_settings().db_url)
    app = make_celery()
    with session_scope() as s:
        prog = make_program(s)
        with_msg = make_experiment(s, prog, content_hash="a").id
        without = make_experiment(s, prog, content_hash="b").id
        young = make_experiment(s, prog, content_hash="c").id
        running = make_experiment(s, prog, status=S.running, content_hash="d").id
        old = db_now(s) - timedelta(seconds=60)
        s.execute(update(Experiment).where(Experiment.id != young).values(queued_at=old))
        s.execute(update(Experiment).where(Experiment.id == young).values(queued_at=db_now(s)))
    publish_experiment(with_msg, "cpu", app=app)
    report = reconcile_broker(app=app, grace=10)
    assert report.republished == [without] and report.queued == 3 and report.live == 1
    assert _filesystem_live_ids(get_settings().broker_dir) == {with_msg, without}
    assert running not in report.republished
    assert reconcile_broker(app=app, grace=10).republished == []  # now live: nothing twice


def _a_silent_run():  # type: ignore[no-untyped-def]
    """A run claimed by w1 whose last heartbeat is 30 s old, on a migrated embedded database."""
    from farm import migrate
    from tests.factories import make_silent_run

    migrate.upgrade(get_settings().db_url)
    return make_celery(), make_silent_run()


def test_reaper_requeues_stale_runs_and_publishes_them_after_commit(farm_env):
    app, exp_id = _a_silent_run()
    reaped = reap_and_requeue(app=app, interval=1, max_retries=2)
    assert reaped == [(exp_id, S.queued)]
    assert _filesystem_live_ids(get_settings().broker_dir) == {exp_id}
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        assert exp.status == S.queued and exp.retry_count == 1 and exp.attempts[0]["worker_id"] == "w1"


def test_reaper_waits_out_a_grace_period_after_a_database_outage(farm_env, monkeypatch):
    """Found by review: after an outage longer than 2 x heartbeat interval the first reaper pass took every run in
    flight for dead (their heartbeats had failed meanwhile) and re-queued them, killing live runs and counting a
    retry each. Now a reaper that just failed to reach the database waits 2 x interval before reaping again."""
    from sqlalchemy.exc import OperationalError

    import farm.recovery as recovery

    monkeypatch.setattr(recovery, "_last_db_failure", None)  # restored after the test: no grace leaks out
    app, exp_id = _a_silent_run()

    def down(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    real_scope = recovery.session_scope
    monkeypatch.setattr(recovery, "session_scope", down)
    try:
        reap_and_requeue(app=app, interval=1, max_retries=2)
        raise AssertionError("the outage should reach the caller")
    except OperationalError:
        pass
    monkeypatch.setattr(recovery, "session_scope", real_scope)
    clock = [recovery.time.monotonic()]
    monkeypatch.setattr(recovery.time, "monotonic", lambda: clock[0])
    assert reap_and_requeue(app=app, interval=1, max_retries=2) == []  # back, but within the grace
    with session_scope() as s:
        assert s.get(Experiment, exp_id).status == S.running
    clock[0] += 2.1
    assert reap_and_requeue(app=app, interval=1, max_retries=2) == [(exp_id, S.queued)]  # still silent: dead


def test_shared_celery_app_follows_the_broker_setting(tmp_path, monkeypatch):
    """Regression: get_celery() cached the first app of the process, so after the broker setting
    changed, re-published messages went to the old broker (and looked lost on the new one)."""
    from farm.broker import get_celery
    from farm.settings import reset_settings_cache

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:1/0")
    reset_settings_cache()
    first = get_celery()
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:2/0")
    reset_settings_cache()
    second = get_celery()
    assert first is not second
    assert second.conf.broker_url == "redis://127.0.0.1:2/0"
    reset_settings_cache()
