"""A worker whose start-up fails (here: the template's prepare.py exits 1) must exit before it
consumes a message, not run unregistered and fail every job it takes."""

from __future__ import annotations

import shutil

from farm.broker import make_celery, publish_experiment
from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, Worker
from tests.factories import make_experiment, make_program
from tests.workerkit import FAKE_TEMPLATE, FAKE_TRAIN, rows, start_worker, stop_worker, worker_env, worker_log


def test_a_failed_start_up_exits_without_consuming(pg_env, tmp_path):
    tpl = tmp_path / "tpl"
    shutil.copytree(FAKE_TEMPLATE, tpl)
    (tpl / "prepare.py").write_text((tpl / "prepare.py").read_text().replace(
        'print("fake prepare: nothing to download")', "raise SystemExit(1)"))
    with session_scope() as s:
        exp_id = make_experiment(s, make_program(s, time_budget=1.0), files={"train.py": FAKE_TRAIN}).id
    publish_experiment(exp_id, "cpu", time_limit=10, app=make_celery())
    proc = start_worker(worker_env(pg_env, FARM_TEMPLATE_DIR=str(tpl)), "bad:cpu0", tmp_path / "logs")
    try:
        code = proc.wait(90)
    finally:
        stop_worker(proc)
    log = worker_log(tmp_path / "logs", "bad:cpu0")
    assert code == 3 and "start-up failed" in log and "prepare.py failed" in log, log[-2000:]
    assert rows(Worker, id="bad:cpu0") == []
    assert rows(Experiment, id=exp_id)[0].status == ExperimentStatus.queued  # the message was not eaten
