"""The state machine against a real Postgres: compare-and-set claims, one result, reaping."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
from sqlalchemy import func, select, update

from farm import states
from farm.db import db_now, make_engine, session_scope
from farm.models import Experiment, ExperimentStatus, Result, Worker
from tests.factories import make_experiment, make_program, make_worker

S = ExperimentStatus


def _racer(url: str, worker_id: str, barrier, jobs, wins) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(url, pool_size=1, max_overflow=0)
    while True:
        exp_id = jobs.get()
        if exp_id is None:
            break
        barrier.wait()
        with session_scope(engine) as s:
            won = states.claim(s, exp_id, worker_id)
        wins.put((exp_id, worker_id, won))
    engine.dispose()


def test_eight_processes_race_to_claim_exactly_one_wins_50_rounds(pg_url):
    engine = make_engine(pg_url)
    n, rounds = 8, 50
    with session_scope(engine) as s:
        prog = make_program(s)
        for i in range(n):
            make_worker(s, f"w{i}")
        ids = [make_experiment(s, prog).id for _ in range(rounds)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    job_queues = [ctx.Queue() for _ in range(n)]
    wins = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(pg_url, f"w{i}", barrier, job_queues[i], wins)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        for exp_id in ids:
            for q in job_queues:
                q.put(exp_id)
        outcomes = [wins.get(timeout=120) for _ in range(n * rounds)]
    finally:
        for q in job_queues:
            q.put(None)
        for p in procs:
            p.join(30)
    by_exp: dict[int, list[str]] = {}
    for exp_id, worker, won in outcomes:
        if won:
            by_exp.setdefault(exp_id, []).append(worker)
    assert sorted(by_exp) == sorted(ids)
    assert all(len(w) == 1 for w in by_exp.values()), {k: v for k, v in by_exp.items() if len(v) != 1}
    with session_scope(engine) as s:
        rows = s.execute(select(Experiment.id, Experiment.worker_id, Experiment.status)).all()
    assert all(r.status == S.running and r.worker_id == by_exp[r.id][0] for r in rows)
    engine.dispose()


def _setup_running(engine, worker_id: str = "w1") -> int:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        prog = make_program(s)
        make_worker(s, worker_id)
        make_worker(s, "w2")
        exp = make_experiment(s, prog)
    with session_scope(engine) as s:
        assert states.claim(s, exp.id, worker_id)
    return exp.id


def test_duplicate_claim_and_duplicate_result_refused(pg_url):
    engine = make_engine(pg_url)
    exp_id = _setup_running(engine)
    with session_scope(engine) as s:
        assert not states.claim(s, exp_id, "w2")
    with session_scope(engine) as s:
        assert states.record_result(s, exp_id, "w1", S.succeeded, val_bpb=1.5)
    with session_scope(engine) as s:
        assert not states.record_result(s, exp_id, "w1", S.succeeded, val_bpb=1.4)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 1
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == S.succeeded and exp.finished_at is not None
        w = s.get(Worker, "w1")
        assert w is not None and w.current_experiment_id is None
    engine.dispose()


def test_a_two_slot_worker_shows_the_run_that_holds_its_device(pg_url):
    """The second claim of a two-slot worker (the job it starts early) does not replace its current
    experiment; the heartbeat of the run that holds the device sets it, and its result clears it."""
    engine = make_engine(pg_url)
    first = _setup_running(engine)
    with session_scope(engine) as s:
        second = make_experiment(s, s.get(Experiment, first).program).id
    with session_scope(engine) as s:
        assert states.claim(s, second, "w1")
    with session_scope(engine) as s:
        assert s.get(Worker, "w1").current_experiment_id == first
        assert states.heartbeat(s, second, "w1", current=False)  # waiting for its turn
    with session_scope(engine) as s:
        assert s.get(Worker, "w1").current_experiment_id == first
        assert states.record_result(s, first, "w1", S.succeeded, val_bpb=1.5)
    with session_scope(engine) as s:
        assert s.get(Worker, "w1").current_experiment_id is None
        assert states.heartbeat(s, second, "w1", current=True)  # its turn: the device is its own
    with session_scope(engine) as s:
        assert s.get(Worker, "w1").current_experiment_id == second
        assert not states.heartbeat(s, first, "w2", current=True)  # a lost claim never becomes current
    with session_scope(engine) as s:
        assert s.get(Worker, "w2").current_experiment_id is None
    engine.dispose()


def test_result_from_a_worker_that_lost_its_claim_is_refused(pg_url):
    engine = make_engine(pg_url)
    exp_id = _setup_running(engine)
    with session_scope(engine) as s:
        s.execute(update(Experiment).values(heartbeat_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 60)))
    with session_scope(engine) as s:
        assert states.reap_stale(s, interval=5, max_retries=2) == [(exp_id, S.queued)]
    with session_scope(engine) as s:
        assert states.claim(s, exp_id, "w2")
    with session_scope(engine) as s:  # the first worker comes back from the dead
        assert not states.record_result(s, exp_id, "w1", S.succeeded, val_bpb=1.0)
        assert not states.heartbeat(s, exp_id, "w1", progress=50)
    with session_scope(engine) as s:
        assert states.record_result(s, exp_id, "w2", S.succeeded, val_bpb=1.1)
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.retry_count == 1 and len(exp.attempts) == 1
        assert exp.attempts[0]["worker_id"] == "w1"
    engine.dispose()


def test_reaper_marks_lost_after_retries_and_uses_database_clock(pg_url):
    engine = make_engine(pg_url)
    exp_id = _setup_running(engine)
    with session_scope(engine) as s:
        # fresh heartbeat by the database's clock: not stale, whatever this process's clock says
        assert states.heartbeat(s, exp_id, "w1", progress=10)
        assert states.reap_stale(s, interval=5, max_retries=0) == []
        now = db_now(s)
        assert abs(now.timestamp() - time.time()) < 60
    with session_scope(engine) as s:
        s.execute(update(Experiment).values(heartbeat_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 11)))
    with session_scope(engine) as s:
        assert states.reap_stale(s, interval=5, max_retries=0) == [(exp_id, S.lost)]
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == S.lost and "lost" in (exp.status_reason or "")
    engine.dispose()


def test_illegal_transition_raises(pg_url):
    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        prog = make_program(s)
        exp = make_experiment(s, prog, status=S.proposed)
    with pytest.raises(states.IllegalTransition), session_scope(engine) as s:
        states.transition(s, exp.id, S.succeeded, expect={S.proposed})
    with session_scope(engine) as s:
        assert states.mark_queued(s, exp.id)
        assert not states.mark_queued(s, exp.id)
    engine.dispose()


def test_sqlite_claim_is_compare_and_set(sqlite_url):
    engine = make_engine(sqlite_url)
    exp_id = _setup_running(engine)
    with session_scope(engine) as s:
        assert not states.claim(s, exp_id, "w2")
        assert states.heartbeat(s, exp_id, "w1", progress=5)
        assert states.reap_stale(s, interval=5, max_retries=1) == []
    engine.dispose()


def test_integration_talks_to_the_real_services(pg_url, redis_url):
    """Fails if the URLs point nowhere: proves the suite uses the Postgres and Redis it started."""
    import redis

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert "PostgreSQL" in conn.exec_driver_sql("select version()").scalar_one()
    engine.dispose()
    r = redis.Redis.from_url(redis_url)
    assert r.ping() and r.info("server")["tcp_port"] == int(os.environ["FARM_TEST_REDIS_PORT"])


def test_a_result_postgres_cannot_store_as_it_is_is_still_recorded(pg_env):
    """Found by review: a NUL byte in the output's last lines (log_tail, crash reason) and a NaN in the timings
    made Postgres refuse the result write (DataError, not OperationalError): nothing caught it, the run stayed
    `running` until reaped and repeated until `lost`."""
    from types import SimpleNamespace

    from farm.settings import get_settings
    from worker import runner
    from worker.outcome import Outcome
    from worker.supervise import ChildRun

    engine = make_engine(pg_env["FARM_DATABASE_URL"])
    with session_scope(engine) as s:
        prog = make_program(s)
        make_worker(s, "w1")
        crashed, nan = make_experiment(s, prog).id, make_experiment(s, prog).id
    with session_scope(engine) as s:
        assert states.claim(s, crashed, "w1") and states.claim(s, nan, "w1")
    ctx = SimpleNamespace(settings=get_settings(), identity=SimpleNamespace(gpu_name=None), worker_id="w1", slug="w1")
    ex = runner.Execution(Outcome(S.crashed, "ValueError: bad \x00 byte"),
                          ChildRun(exit_code=1, tail=["step 1 loss 2.0 \x00", "ValueError: bad \x00 byte"]))
    assert runner._record(ctx, SimpleNamespace(id=crashed, hw_class="cpu", retry=0), ex)  # type: ignore[arg-type]
    ex = runner.Execution(Outcome(S.succeeded, None, {"val_bpb": 1.2}),
                          timings={"child_seconds": 3.0, "training_seconds": float("nan")})
    assert runner._record(ctx, SimpleNamespace(id=nan, hw_class="cpu", retry=0), ex)  # type: ignore[arg-type]
    with session_scope(engine) as s:
        first = s.scalars(select(Result).where(Result.experiment_id == crashed)).one()
        assert first.outcome == S.crashed and first.reason == "ValueError: bad  byte"
        assert first.log_tail == "step 1 loss 2.0 \nValueError: bad  byte"
        second = s.scalars(select(Result).where(Result.experiment_id == nan)).one()
        assert second.outcome == S.refused and second.val_bpb is None and second.timings == {"child_seconds": 3.0}
        assert "database refused the result" in (second.reason or "")
        exp = s.get(Experiment, nan)
        assert exp is not None and exp.status == S.refused


def test_a_worker_that_beats_less_often_than_the_reader_is_judged_by_its_own_interval(pg_url, tmp_path):
    """Regression: every reaper, the scheduler's count of live workers and the dashboard judged a worker by their
    own FARM_HEARTBEAT_INTERVAL. A worker host set to beat every 30 s beside a scheduler at 5 s had each of its
    runs re-queued, and so run twice, after 10 s. Workers now record their interval (workers.heartbeat_interval)."""
    from api import crud
    from farm.settings import Settings
    from scheduler.loop import Scheduler

    engine = make_engine(pg_url)

    def ago(seconds: int):  # type: ignore[no-untyped-def]
        return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)

    with session_scope(engine) as s:
        prog = make_program(s)
        make_worker(s, "slow").heartbeat_interval = 30.0
        make_worker(s, "fast")  # an older worker that records no interval: the reader's own applies
        slow_run, fast_run = make_experiment(s, prog).id, make_experiment(s, prog).id
    with session_scope(engine) as s:
        assert states.claim(s, slow_run, "slow") and states.claim(s, fast_run, "fast")
    with session_scope(engine) as s:
        s.execute(update(Experiment).values(heartbeat_at=ago(15)))
        s.execute(update(Worker).values(last_heartbeat=ago(15)))
    sched = Scheduler(Settings(database_url=pg_url, home=tmp_path), engine=engine, publish=lambda *a, **k: None)
    try:
        with session_scope(engine) as s:
            assert states.reap_stale(s, interval=5, max_retries=0) == [(fast_run, S.lost)]
            assert {w.id: w.state for w in crud.list_workers(s, heartbeat_interval=5)} == {
                "slow": "alive", "fast": "stale"}
            assert sched._live_workers(s) == {"cpu": 1}
        with session_scope(engine) as s:
            s.execute(update(Experiment).where(Experiment.id == slow_run).values(heartbeat_at=ago(61)))
            s.execute(update(Worker).values(last_heartbeat=ago(61)))
        with session_scope(engine) as s:
            assert states.reap_stale(s, interval=5, max_retries=0) == [(slow_run, S.lost)]
            exp = s.get(Experiment, slow_run)
            assert exp is not None and "heartbeat older than 60s" in (exp.status_reason or "")
            assert sched._live_workers(s) == {}
    finally:
        sched.pool.shutdown()
        engine.dispose()
