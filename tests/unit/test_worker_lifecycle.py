"""Start-up: a worker without a sandbox says so loudly and in `workers`; with bwrap it registers ok."""

from __future__ import annotations

import pytest

from farm import migrate
from farm.db import session_scope
from farm.models import Worker
from farm.settings import get_settings, reset_settings_cache
from tests.workerkit import FAKE_TEMPLATE
from worker import lifecycle


def _start(monkeypatch, sandbox: str):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FARM_SANDBOX", sandbox)
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(FAKE_TEMPLATE))
    monkeypatch.setenv("FARM_WORKER_ID", f"t:{sandbox}")
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    ctx = lifecycle.start(prepare=True, reaper=False)  # the fake prepare.py runs and succeeds
    with session_scope() as s:
        row = s.get(Worker, ctx.worker_id)
        assert row is not None
        return row.sandbox_ok, row.sandbox, row.hw_class, row.torch_version


def test_no_sandbox_is_reported_loudly(farm_env, monkeypatch, capsys):
    ok, desc, hw, _ = _start(monkeypatch, "none")
    assert not ok and desc.startswith("none") and hw == "cpu"
    assert "SANDBOX NOT AVAILABLE" in capsys.readouterr().err


def test_bubblewrap_works_here(farm_env, monkeypatch):
    ok, desc, _, torch_version = _start(monkeypatch, "auto")
    assert ok and desc.startswith("bwrap") and torch_version


def test_start_sweeps_this_workers_leftover_workdirs_and_a_bloated_compile_cache(farm_env, monkeypatch):
    """Found by review: a worker killed mid-run left its workdir (150 MB a candidate wrote) forever, and junk a
    candidate wrote into the shared compile cache stayed there across runs."""
    from worker.disk import workdir_name

    monkeypatch.setenv("FARM_COMPILE_CACHE_MB", "1")
    s = get_settings()
    work = s.workdirs
    mine = work / workdir_name("t_none", 7, 0, "abc123")
    mine_eval = work / f"{workdir_name('t_none', 7, 0, 'abc123')}-eval"  # the isolated evaluation's folder
    other = work / workdir_name("t_none0", 7, 0, "abc123")  # another worker whose name starts the same
    stray = work / "t_none-notes"
    for d in (mine, mine_eval, other, stray):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x" * 10)
    cache = s.cache_dir / "compile" / "t_none"
    (cache / "inductor" / "junk").mkdir(parents=True)
    (cache / "inductor" / "junk" / "blob").write_bytes(b"\0" * (2 << 20))
    _start(monkeypatch, "none")
    assert not mine.exists() and not mine_eval.exists() and other.exists() and stray.exists()
    assert (cache / "inductor").is_dir() and not (cache / "inductor" / "junk").exists()


def test_a_cache_under_its_limit_is_kept_and_only_the_last_run_trims(tmp_path):
    from worker import disk

    cache = tmp_path / "c"
    (cache / "triton").mkdir(parents=True)
    (cache / "triton" / "k").write_bytes(b"\0" * (2 << 20))
    assert not disk.trim_compile_cache(cache, 3) and (cache / "triton" / "k").exists()
    disk.begin_run()
    disk.begin_run()
    disk.end_run(cache, 1)  # the other run may be compiling into it: kept
    assert (cache / "triton" / "k").exists()
    disk.end_run(cache, 1)
    assert not (cache / "triton" / "k").exists() and (cache / "triton").is_dir()


def test_the_reaper_thread_waits_out_the_grace_after_an_outage_its_touch_ran_into(farm_env, monkeypatch):
    """Found by review: the worker's reaper thread touches its own row before it reaps. In an outage the touch
    failed, the thread swallowed the error and never reached reap_and_requeue, so the outage was never noted; the
    first tick after the database came back re-queued every run whose heartbeats had failed meanwhile (live runs
    killed, a retry counted each)."""
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    import farm.recovery as recovery
    from farm.models import Experiment, ExperimentStatus
    from tests.factories import make_silent_run

    monkeypatch.setattr(recovery, "_last_db_failure", None)  # restored after the test: no grace leaks out
    migrate.upgrade(get_settings().db_url)
    exp_id = make_silent_run()  # alive, but its heartbeats failed during a 30 s outage
    real_touch = lifecycle.identity.touch
    touches = [0]

    def touch(session, worker_id):  # type: ignore[no-untyped-def]
        touches[0] += 1
        if touches[0] == 1:
            raise OperationalError("UPDATE workers", {}, Exception("could not connect: network unreachable"))
        real_touch(session, worker_id)

    monkeypatch.setattr(lifecycle.identity, "touch", touch)
    monkeypatch.setattr(recovery, "publish_experiment", lambda *a, **k: None)
    ticks = iter([False, False, True])  # tick 1: the outage; tick 2: the database is back; then stop
    monkeypatch.setattr(lifecycle, "_stop", SimpleNamespace(wait=lambda timeout: next(ticks)))
    lifecycle._reaper_loop(SimpleNamespace(worker_id="w1", settings=get_settings()), 5.0)  # type: ignore[arg-type]
    assert touches[0] == 2 and recovery._last_db_failure is not None
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == ExperimentStatus.running and exp.retry_count == 0


def test_the_result_is_written_before_the_workdir_is_removed_and_the_cache_trimmed(farm_env, monkeypatch):
    """Found by review: the workdir's removal and the compile cache's size check (and emptying) ran before the
    result write, with no heartbeat in between: a run that left gigabytes behind took long enough for the reaper
    (2 x heartbeat interval) to re-queue it, and its result was discarded. Now the result is written first."""
    from farm.models import Experiment, ExperimentStatus
    from tests.factories import make_experiment, make_program
    from tests.workerkit import FAKE_TRAIN
    from worker import runner

    monkeypatch.setenv("FARM_SANDBOX", "none")
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(FAKE_TEMPLATE))
    monkeypatch.setenv("FARM_WORKER_ID", "t:order")
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    ctx = lifecycle.start(prepare=True, reaper=False)
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s, time_budget=0.5), files={"train.py": FAKE_TRAIN}).id
    events: list[str] = []
    real_record, real_end_run = runner.states.record_result, runner.disk.end_run

    def workdirs() -> list[str]:
        return [p.name for p in ctx.settings.workdirs.glob(f"{ctx.slug}-e{exp_id}-*")]

    def record(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append(f"record with {len(workdirs())} workdir(s)")
        return real_record(*args, **kwargs)

    def end_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("trim")
        real_end_run(*args, **kwargs)

    monkeypatch.setattr(runner.states, "record_result", record)
    monkeypatch.setattr(runner.disk, "end_run", end_run)
    report = runner.run_experiment(exp_id, ctx)
    assert report.status == "succeeded", report.reason
    assert events == ["record with 1 workdir(s)", "trim"]
    assert workdirs() == []  # removed all the same
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == ExperimentStatus.succeeded


def test_a_worker_told_to_shut_down_hands_its_run_back_without_a_retry(farm_env, monkeypatch):
    """Found by review: `docker compose stop` sends SIGTERM and kills the worker 60 s later, inside a 300 s run. The
    run was left `running`, reaped later and counted a retry (two and it was `lost`), where `farm up` hands such
    runs back without one. Now Celery's warm shutdown (worker_shutting_down) stops the run at once and queues it
    again, no retry counted, published for the next worker."""
    import threading
    import time

    from celery.signals import worker_shutting_down

    import worker.app  # noqa: F401 - connects the worker's signal handlers
    from farm.models import Experiment, ExperimentStatus
    from farm.recovery import live_experiment_ids
    from tests.factories import make_experiment, make_program
    from tests.workerkit import FAKE_TRAIN
    from worker import runner

    monkeypatch.setenv("FARM_SANDBOX", "none")
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(FAKE_TEMPLATE))
    monkeypatch.setenv("FARM_WORKER_ID", "t:term")
    monkeypatch.setenv("FARM_HEARTBEAT_INTERVAL", "0.5")
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    ctx = lifecycle.start(prepare=True, reaper=False)
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s, time_budget=60.0), files={"train.py": FAKE_TRAIN},
                                 retry_count=1).id
    reports: list[runner.RunReport] = []
    t = threading.Thread(target=lambda: reports.append(runner.run_experiment(exp_id, ctx)), daemon=True)
    t.start()
    while True:  # training
        with session_scope() as s:
            exp = s.get(Experiment, exp_id)
            if exp is not None and exp.progress:
                break
        assert t.is_alive()
        time.sleep(0.1)
    worker_shutting_down.send(sender="t:term", sig="SIGTERM", how="Warm", exitcode=0)
    t.join(timeout=15)
    assert not t.is_alive() and reports[0].status == "released"
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == ExperimentStatus.queued and exp.retry_count == 1
        assert exp.worker_id is None and exp.attempts[-1]["reason"].startswith("its worker was shut down")
    assert exp_id in (live_experiment_ids(get_settings(), {"cpu"}) or set())
    assert not list(ctx.settings.workdirs.glob(f"{ctx.slug}-e{exp_id}-*"))
    # the message it handed back, taken again during the warm shutdown: not claimed (it was, and stopped 26 ms
    # later: a second attempt entry, found by review), and the task puts the message back
    attempts = len(exp.attempts)
    assert runner.run_experiment(exp_id, ctx).status == "declined"
    from worker import tasks

    class _Task:
        request = type("R", (), {"retries": 0})()

    monkeypatch.setattr(lifecycle, "context", lambda: ctx)
    published: list[int] = []
    monkeypatch.setattr("farm.recovery._publish_all", lambda jobs, app, s: published.extend(j[0] for j in jobs))
    assert tasks.run_experiment(_Task(), exp_id) == "declined"  # type: ignore[arg-type]
    assert published == [exp_id]  # a new message for the next worker
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        assert exp is not None and exp.status == ExperimentStatus.queued and len(exp.attempts) == attempts


def test_an_isolated_evaluation_under_way_gets_the_stop_grace_unless_told_twice(monkeypatch):
    """The grace itself runs in tests/integration/test_worker_recovery.py; here the signals that end it."""
    from types import SimpleNamespace

    from worker import runner

    now = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(lifecycle.time, "monotonic", lambda: now[0])
    limits = runner.Limits(startup_allowance=1, eval_allowance=1, memory_mb=100, log_cap_bytes=1, file_size_mb=1,
                           stop_eval_grace=30.0)
    for second in ("Warm", "Cold", None):
        ctx = runner.WorkerContext(settings=SimpleNamespace(), identity=SimpleNamespace(),  # type: ignore[arg-type]
                                   sandbox=SimpleNamespace(), limits=limits)  # type: ignore[arg-type]
        monkeypatch.setattr(lifecycle, "_ctx", ctx)
        assert not ctx.evaluation_must_stop()
        lifecycle.shutting_down("Warm")
        assert ctx.stopping and not ctx.evaluation_must_stop()
        now[0] += 10
        assert not ctx.evaluation_must_stop()
        if second is None:  # no second signal: the grace runs out
            now[0] += 20
        else:  # Ctrl-C twice, SIGTERM twice, or Celery's cold shutdown (SIGQUIT)
            lifecycle.shutting_down(second)
        assert ctx.evaluation_must_stop()
    ctx = runner.WorkerContext(settings=SimpleNamespace(), identity=SimpleNamespace(),  # type: ignore[arg-type]
                               sandbox=SimpleNamespace(), limits=limits)  # type: ignore[arg-type]
    monkeypatch.setattr(lifecycle, "_ctx", ctx)
    lifecycle.shutting_down("Cold")  # a cold shutdown first: no grace
    assert ctx.evaluation_must_stop()


def test_start_says_which_template_settings_runs_do_not_see_and_records_its_heartbeat_interval(
        farm_env, monkeypatch, caplog):
    import logging

    monkeypatch.setenv("FARM_EVAL_TOKENS", "1000")
    monkeypatch.setenv("FARM_KERNELS", "off")
    monkeypatch.setenv("FARM_HEARTBEAT_INTERVAL", "7")
    with caplog.at_level(logging.WARNING, logger="worker.lifecycle"):
        _start(monkeypatch, "none")
    said = [r.getMessage() for r in caplog.records if "runs do not see" in r.getMessage()]
    assert len(said) == 1 and "FARM_EVAL_TOKENS, FARM_KERNELS set in" in said[0], said
    with session_scope() as s:
        assert s.get(Worker, "t:none").heartbeat_interval == 7.0


def test_a_result_the_database_could_not_take_before_a_shutdown_is_recorded_at_the_next_start(
        farm_env, monkeypatch):
    """Found by review: a worker told to stop while it retried a result write through a database outage was killed
    by its container 60 s later, and the finished run's result was lost (the run repeated). The result waits on
    disk (FARM_HOME/pending) from the first failed write and is recorded when the worker starts again."""
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from farm import states
    from farm.models import Experiment, ExperimentStatus, Result
    from tests.factories import make_experiment, make_program
    from worker import runner
    from worker.outcome import Outcome

    monkeypatch.setenv("FARM_RECORD_PATIENCE", "0.3")
    _start(monkeypatch, "none")
    ctx = lifecycle.context()
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s)).id
        assert states.claim(s, exp_id, ctx.worker_id)

    def outage(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT INTO results", {}, Exception("could not connect to server"))

    job = SimpleNamespace(id=exp_id, retry=0, hw_class="cpu")
    ex = runner.Execution(Outcome(ExperimentStatus.succeeded, None, {"val_bpb": 1.23}),
                          timings={"child_seconds": 3.5, "sandbox": "none"})
    with monkeypatch.context() as m:
        m.setattr(runner.states, "record_result", outage)
        with pytest.raises(OperationalError):
            runner._record(ctx, job, ex)  # type: ignore[arg-type]
    pending = runner.pending_path(ctx, exp_id, 0)
    assert pending.is_file()
    lifecycle.start(prepare=False, reaper=False)  # the worker again, the database back
    assert not pending.exists()
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        res = s.query(Result).filter_by(experiment_id=exp_id).one()
        assert exp is not None and exp.status == ExperimentStatus.succeeded
        assert res.val_bpb == 1.23 and res.timings["child_seconds"] == 3.5
    # a result recorded at once leaves nothing behind
    with session_scope() as s:
        other = make_experiment(s, make_program(s, slug="other")).id
        assert states.claim(s, other, ctx.worker_id)
    assert runner._record(ctx, SimpleNamespace(id=other, retry=0, hw_class="cpu"), ex)  # type: ignore[arg-type]
    assert not runner.pending_path(ctx, other, 0).exists()
