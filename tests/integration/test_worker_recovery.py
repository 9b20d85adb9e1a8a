"""Losing things and getting them back: a worker killed with SIGKILL mid-run (Postgres + Redis, and
the embedded SQLite + filesystem transport, which never redelivers), and Redis restarted empty
while experiments are queued. Every experiment completes, with exactly one result."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from farm import migrate
from farm.broker import make_celery, publish_experiment
from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, Result
from farm.recovery import reconcile_broker
from farm.settings import get_settings, reset_settings_cache
from tests.factories import make_experiment, make_program, make_worker
from tests.procs import free_port, start_redis, stop_redis
from tests.workerkit import (
    FAKE_TRAIN,
    FINISHED,
    isolated_fake_template,
    rows,
    wait_status,
    worker_env,
    workers,
)

S = ExperimentStatus


def _kill_the_runner_and_check_recovery(env: dict[str, str], tmp_path: Path) -> None:
    with session_scope() as s:
        prog = make_program(s, time_budget=4.0)
        exp_id = make_experiment(s, prog, files={"train.py": FAKE_TRAIN}).id
    publish_experiment(exp_id, "cpu", time_limit=10, app=make_celery())
    names = ["a:cpu0", "b:cpu1"]
    with workers(worker_env(env), names, tmp_path / "logs") as procs:
        wait_status([exp_id], [S.running], timeout=30)
        time.sleep(1.0)  # mid-run: the child is training
        victim = rows(Experiment, id=exp_id)[0].worker_id
        proc = procs[names.index(victim)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        final = wait_status([exp_id], FINISHED, timeout=60)
        # the killed worker's training child died with it (bwrap --die-with-parent)
        left = subprocess.run(["pgrep", "-f", f"{victim.replace(':', '_')}-e{exp_id}-r0"],
                              capture_output=True, text=True).stdout.split()
    assert final[exp_id] == S.succeeded
    exp = rows(Experiment, id=exp_id)[0]
    survivor = names[1 - names.index(victim)]
    assert exp.retry_count == 1 and exp.worker_id == survivor
    assert [a["worker_id"] for a in exp.attempts] == [victim]  # the retry history is kept
    with session_scope() as s:
        results = s.execute(select(Result).where(Result.experiment_id == exp_id)).scalars().all()
        assert len(results) == 1 and results[0].worker_id == survivor
    assert left == []


def test_sigkill_mid_run_is_requeued_and_completed_by_another_worker(pg_env, tmp_path):
    _kill_the_runner_and_check_recovery(pg_env, tmp_path)


SQLITE_WRITER = """import os, sqlite3, sys
import prepare
home = 'FARM_HOME_PATH'
wrote = []
for path in (os.path.join(home, 'farm.db'),):
    try:
        db = sqlite3.connect(f'file:{path}?mode=rw', uri=True, timeout=1)
        db.execute("UPDATE experiments SET status = 'succeeded'")
        db.execute("INSERT INTO results (experiment_id, outcome, val_bpb) VALUES (EXP_ID, 'succeeded', 0.01)")
        db.commit()
        wrote.append(path)
    except Exception as exc:
        print('sqlite:', exc)
if wrote:
    print('WROTE', wrote)
    sys.exit(7)
prepare.finish(1.25, steps=3)
"""


def test_embedded_mode_loses_nothing_when_a_worker_is_sigkilled(farm_env, tmp_path):
    """SQLite + filesystem transport (the zero-install default): no redelivery, the reaper re-queues."""
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    _kill_the_runner_and_check_recovery(farm_env, tmp_path)
    # and a candidate that opens the embedded database file to write itself a result gets nowhere
    with session_scope() as s:
        prog = make_program(s, slug="p2", time_budget=1.0)
        exp = make_experiment(s, prog, files={"train.py": "pending"})
        exp.files = {"train.py": SQLITE_WRITER.replace("FARM_HOME_PATH", farm_env["FARM_HOME"])
                     .replace("EXP_ID", str(exp.id))}
        exp_id = exp.id
    publish_experiment(exp_id, "cpu", app=make_celery())
    with workers(worker_env(farm_env), ["c:cpu0"], tmp_path / "logs2"):
        wait_status([exp_id], FINISHED, timeout=30)
    res = rows(Result, experiment_id=exp_id)[0]
    assert res.outcome == S.succeeded and res.val_bpb == 1.25, res.log_tail
    assert "sqlite:" in res.log_tail
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 2


def test_redis_restarted_empty_while_queued_everything_still_completes(pg_env, tmp_path, monkeypatch):
    port = free_port()
    start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    monkeypatch.setenv("FARM_BROKER_URL", url)
    env = dict(pg_env, FARM_BROKER_URL=url)
    reset_settings_cache()
    try:
        with session_scope() as s:
            prog = make_program(s, time_budget=1.0)
            ids = [make_experiment(s, prog, files={"train.py": FAKE_TRAIN}, content_hash=str(i)).id
                   for i in range(4)]
        with workers(worker_env(env), ["r:cpu0"], tmp_path / "logs"):
            app = make_celery()
            for exp_id in ids:
                publish_experiment(exp_id, "cpu", time_limit=10, app=app)
            wait_status(ids[:1], [S.running], timeout=30)
            # Redis goes away and comes back empty: the queued messages are gone
            stop_redis(port)
            time.sleep(0.5)
            start_redis(port, tmp_path)
            time.sleep(1.5)
            queued_then = {e.id for e in rows(Experiment, status=S.queued)}
            assert len(queued_then) >= 2
            report = reconcile_broker(grace=0.0)  # what the scheduler loop does periodically
            # (the worker may claim one between the two reads: claimed ones are not re-published)
            assert set(report.republished) <= queued_then and len(report.republished) >= len(queued_then) - 1
            again = reconcile_broker(grace=0.0)  # their messages are live now: nothing republished
            assert not set(again.republished) & queued_then
            final = wait_status(ids, FINISHED, timeout=90)
        assert all(st == S.succeeded for st in final.values()), final
        with session_scope() as s:
            for exp_id in ids:
                assert s.scalar(select(func.count()).select_from(Result)
                                .where(Result.experiment_id == exp_id)) == 1
    finally:
        stop_redis(port)


def test_a_worker_stopped_with_sigterm_hands_its_run_back_without_a_retry(farm_env, tmp_path):
    """Found by review: `docker compose stop` sends SIGTERM and kills the worker 60 s later, inside a 300 s run;
    Celery's warm shutdown waited for the run, so it was killed with the worker, reaped later and counted a retry
    (two and it was `lost`). Now the worker stops the run at once and queues it again, no retry counted."""
    from farm.recovery import live_experiment_ids

    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s, time_budget=30.0), files={"train.py": FAKE_TRAIN}).id
    publish_experiment(exp_id, "cpu", time_limit=60, app=make_celery())
    with workers(worker_env(farm_env), ["a:cpu0"], tmp_path / "logs") as procs:
        wait_status([exp_id], [S.running], timeout=30)
        time.sleep(1.5)  # mid-run: the child is training
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(20)
        stopped_in = time.monotonic() - t0
    exp = rows(Experiment, id=exp_id)[0]
    assert exp.status == S.queued and exp.retry_count == 0 and exp.worker_id is None, exp.status_reason
    assert exp.attempts[-1]["reason"].startswith("its worker was shut down") and stopped_in < 15
    assert exp_id in (live_experiment_ids(get_settings(), {"cpu"}) or set())  # published for the next worker


def _stop_during_the_isolated_evaluation(farm_env: dict[str, str], tmp_path: Path, *, eval_sleep: float,
                                         grace: float) -> tuple[Experiment, float, list[Result]]:
    """A run whose training is over and whose isolated evaluation takes `eval_sleep` s, its worker sent SIGTERM
    once the evaluation has begun, with FARM_STOP_EVAL_GRACE=`grace`: the experiment, the seconds the worker took
    to stop, its results."""
    template = isolated_fake_template(tmp_path / "template")
    env = worker_env(farm_env, FARM_TEMPLATE_DIR=str(template), FARM_EVAL_ALLOWANCE="120",
                     FARM_STOP_EVAL_GRACE=f"{grace:g}")
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    train = FAKE_TRAIN.replace("steps=step)", f"steps=step, eval_sleep={eval_sleep})")
    assert train != FAKE_TRAIN
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s, time_budget=1.0), files={"train.py": train}).id
    publish_experiment(exp_id, "cpu", time_limit=300, app=make_celery())
    with workers(env, ["a:cpu0"], tmp_path / "logs") as procs:
        wait_status([exp_id], [S.running], timeout=30)
        deadline = time.monotonic() + 30
        while not list(get_settings().workdirs.glob(f"*-e{exp_id}-*-eval/model.json")):  # the export moved in
            assert time.monotonic() < deadline, "the isolated evaluation never began"
            time.sleep(0.1)
        time.sleep(0.5)
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(60)
        stopped_in = time.monotonic() - t0
    with session_scope() as s:
        results = list(s.execute(select(Result).where(Result.experiment_id == exp_id)).scalars())
    return rows(Experiment, id=exp_id)[0], stopped_in, results


def test_a_shutdown_lets_an_isolated_evaluation_under_way_finish(farm_env, tmp_path):
    """Found by review: SIGTERM during the isolated evaluation stopped it and handed the run back, so a run whose
    training was over (5 minutes of a GPU) trained again from the start. The evaluation now finishes within
    FARM_STOP_EVAL_GRACE, and the run is judged and recorded as usual."""
    exp, stopped_in, results = _stop_during_the_isolated_evaluation(farm_env, tmp_path, eval_sleep=4.0, grace=30.0)
    assert exp.status == S.succeeded and exp.retry_count == 0, exp.status_reason
    assert len(results) == 1 and results[0].val_bpb == pytest.approx(1.5, abs=0.01)
    assert results[0].timings["evaluation"] == "isolated"
    assert 3.0 < stopped_in < 30


def test_a_shutdown_stops_an_isolated_evaluation_past_the_grace_and_hands_the_run_back(farm_env, tmp_path):
    exp, stopped_in, results = _stop_during_the_isolated_evaluation(farm_env, tmp_path, eval_sleep=60.0, grace=1.0)
    assert exp.status == S.queued and exp.retry_count == 0 and exp.worker_id is None, exp.status_reason
    assert exp.attempts[-1]["reason"].startswith("its worker was shut down") and not results
    assert stopped_in < 20



def test_a_run_killed_for_a_lost_claim_records_nothing_over_the_next_attempt_of_the_same_worker(pg_env, tmp_path):
    """Found by review: results were matched on (experiment, worker id) only. Slot A of a two-slot worker loses its
    claim (reaped: re-queued), slot B of the same worker takes the new message and claims the experiment again, and
    A's run, killed as claim_lost, was judged "crashed" and recorded on B's attempt (B was then killed at its next
    beat, and the change went to repair). The real run path here; the reap and B's claim happen inside A's beat."""
    from sqlalchemy import update

    from farm import states
    from worker import runner
    from worker.identity import Identity
    from worker.sandbox import Sandbox

    with session_scope() as s:
        prog = make_program(s, time_budget=30.0)
        exp_id = make_experiment(s, prog, files={"train.py": FAKE_TRAIN}, seed=1).id
        make_worker(s, "slots:cpu0")
    worker_id = "slots:cpu0"
    settings = get_settings()
    ctx = runner.WorkerContext(settings=settings, identity=Identity(worker_id=worker_id, host="h", hw_class="cpu"),
                               sandbox=Sandbox("none", False, "test"), limits=runner.Limits.from_settings(settings))
    real_heartbeat = runner._heartbeat
    beats: list[bool] = []

    def heartbeat(ctx_, job_id, holds_device=None):  # type: ignore[no-untyped-def]
        tick = real_heartbeat(ctx_, job_id, holds_device)

        def reaped_then_reclaimed(progress):  # type: ignore[no-untyped-def]
            with session_scope() as s:  # the reaper: A's beats were late, the run goes back to the queue
                s.execute(update(Experiment).where(Experiment.id == job_id)
                          .values(status=S.queued, worker_id=None, retry_count=Experiment.retry_count + 1))
            beats.append(tick(progress))  # A finds its claim gone: its run is killed
            with session_scope() as s:  # slot B, same worker id, takes the new message
                assert states.claim(s, job_id, worker_id)
            return beats[-1]
        return reaped_then_reclaimed

    runner._heartbeat = heartbeat  # type: ignore[assignment]
    try:
        report = runner.run_experiment(exp_id, ctx)
    finally:
        runner._heartbeat = real_heartbeat  # type: ignore[assignment]
    assert beats == [False] and report.status == "discarded"
    exp = rows(Experiment, id=exp_id)[0]
    assert exp.status == S.running and exp.worker_id == worker_id  # B's attempt, untouched
    assert rows(Result, experiment_id=exp_id) == []
