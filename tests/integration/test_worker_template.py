"""The real training template end to end: `farm worker --cpu` prepares the data cache, then runs a
queued cpu-profile experiment (the baseline train.py) in the sandbox; the signed metrics land in
Postgres. About a minute on 2 cores, most of it torch start-up and the harness's evaluation."""

from __future__ import annotations

import pytest

from farm.broker import make_celery, publish_experiment
from farm.db import session_scope
from farm.harness import harness_checksum
from farm.models import Experiment, ExperimentStatus, Result
from tests.factories import make_experiment, make_program
from tests.workerkit import FINISHED, ROOT, rows, wait_status, worker_env, workers

S = ExperimentStatus
TEMPLATE = ROOT / "training_template"


@pytest.mark.slow
def test_real_template_cpu_run_lands_signed_metrics_in_postgres(pg_env, tmp_path):
    train = (TEMPLATE / "train.py").read_text()
    with session_scope() as s:
        prog = make_program(s, time_budget=2.0, template_digest=harness_checksum(TEMPLATE))
        exp_id = make_experiment(s, prog, files={"train.py": train}, seed=3, proposer_kind="baseline").id
    publish_experiment(exp_id, "cpu", time_limit=300, app=make_celery())
    env = worker_env(pg_env, FARM_STARTUP_ALLOWANCE="150", FARM_EVAL_ALLOWANCE="90",
                     FARM_WORKER_MEMORY_MB="4000", FARM_LOG_CAP_MB="4")
    env.pop("FARM_TEMPLATE_DIR")  # the repo's training_template/
    with workers(env, ["tpl:cpu0"], tmp_path / "logs", timeout=180):
        wait_status([exp_id], FINISHED, timeout=300)
    exp = rows(Experiment, id=exp_id)[0]
    res = rows(Result, experiment_id=exp_id)[0]
    assert exp.status == S.succeeded, f"{exp.status_reason}\n{res.log_tail}"
    assert res.val_bpb is not None and 0.5 < res.val_bpb < 20 and res.test_bpb is not None
    assert res.num_steps and res.num_steps >= 1 and res.depth and res.num_params_m
    assert res.training_seconds and res.training_seconds >= 2.0
    assert res.startup_seconds is not None and res.eval_seconds is not None
    assert res.gpu_name and res.gpu_name.startswith("cpu")
    assert {"startup_seconds", "training_seconds", "eval_seconds", "setup_seconds", "child_seconds",
            "overhead_seconds"} <= set(res.timings)
    assert "val_bpb:" in res.log_tail
