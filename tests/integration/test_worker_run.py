"""A real `farm worker` (Celery, solo pool) against Postgres and Redis: a queued cpu experiment
runs to completion, and duplicate deliveries run nothing twice."""

from __future__ import annotations

from sqlalchemy import func, select

from farm.broker import make_celery, publish_experiment
from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, Result, Worker
from tests.factories import make_experiment, make_program
from tests.workerkit import FAKE_TRAIN, FINISHED, rows, wait_status, worker_env, workers

S = ExperimentStatus


def test_queued_cpu_experiment_runs_and_metrics_land_in_postgres(pg_env, tmp_path):
    with session_scope() as s:
        prog = make_program(s, time_budget=2.0)
        exp_id = make_experiment(s, prog, files={"train.py": FAKE_TRAIN}, seed=5).id
        dup_id = make_experiment(s, prog, files={"train.py": FAKE_TRAIN}, seed=6, content_hash="dup").id
    app = make_celery()
    publish_experiment(exp_id, "cpu", time_limit=10, app=app)
    # the same id delivered three times: one run, one result
    for _ in range(3):
        publish_experiment(dup_id, "cpu", time_limit=10, app=app)
    with workers(worker_env(pg_env), ["test:cpu0"], tmp_path / "logs"):
        wait_status([exp_id, dup_id], FINISHED, timeout=60)
        publish_experiment(exp_id, "cpu", app=app)  # late duplicate of a finished experiment
        wait_status([exp_id], FINISHED, timeout=5)
        worker_row = rows(Worker, id="test:cpu0")[0]
    exp = rows(Experiment, id=exp_id)[0]
    assert exp.status == S.succeeded, exp.status_reason
    assert exp.progress == 100.0 and exp.current_loss is not None  # progress lines were parsed
    res = rows(Result, experiment_id=exp_id)[0]
    assert res.val_bpb == 1.5 + 0.001 * (5 % 7) and res.num_steps and res.num_steps > 5
    assert res.training_seconds == 2.0 and res.startup_seconds is not None and res.eval_seconds is not None
    for key in ("claim_seconds", "setup_seconds", "child_seconds", "overhead_seconds"):
        assert key in res.timings
    assert res.worker_id == "test:cpu0" and res.hw_class == "cpu" and "val_bpb" in res.log_tail
    assert worker_row.sandbox_ok and worker_row.sandbox.startswith("bwrap") and worker_row.torch_version
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Result).where(Result.experiment_id == dup_id)) == 1
        assert s.get(Experiment, dup_id).status == S.succeeded
        assert s.get(Worker, "test:cpu0").stopped_at is not None  # marked stopped on shutdown
