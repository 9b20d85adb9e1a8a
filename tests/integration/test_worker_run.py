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


# A candidate that fails whenever it starts while the other slot's run holds the device (as an out-of-memory
# beside it would): it reads its gate without blocking at start.
BESIDE_TRAIN = '''import os, sys, time
import prepare
fd = int(os.environ["FARM_GATE_FD"])
os.set_blocking(fd, False)
try:
    my_turn = os.read(fd, 1) != b""
except BlockingIOError:
    my_turn = False
if not my_turn:
    print("simulated: out of device memory beside the other run", flush=True)
    sys.exit(1)
time.sleep(prepare.TIME_BUDGET)
prepare.finish(1.5 + 0.001 * (prepare.SEED % 7), steps=1)
'''


def test_two_slots_a_run_that_fails_before_its_turn_is_started_again_alone(pg_env, tmp_path):
    with session_scope() as s:
        prog = make_program(s, time_budget=4.0)  # long enough that the second starts while the first runs
        ids = [make_experiment(s, prog, files={"train.py": BESIDE_TRAIN}, seed=i, content_hash=f"b{i}").id
               for i in range(2)]
    app = make_celery()
    for i in ids:
        publish_experiment(i, "cpu", time_limit=30, app=app)
    with workers(worker_env(pg_env, FARM_WORKER_SLOTS="2"), ["slots:cpu0"], tmp_path / "logs"):
        wait_status(ids, FINISHED, timeout=60)
    results = [rows(Result, experiment_id=i)[0] for i in ids]
    assert [rows(Experiment, id=i)[0].status for i in ids] == [S.succeeded, S.succeeded], [r.log_tail for r in results]
    # one held the device from the start; the other failed beside it, then ran alone after it
    assert sorted(r.timings["restarted_alone"] for r in results) == [False, True]
    again = next(r for r in results if r.timings["restarted_alone"])
    first = next(r for r in results if not r.timings["restarted_alone"])
    assert again.timings["gate_opened_at"] >= first.timings["exited_at"] - 0.01
    assert again.timings["spawned_at"] >= again.timings["gate_opened_at"] - 0.01  # spawned only in its turn


# A candidate that does not wait for its turn: it "trains" at once, beside the run that holds the device, then, from
# its turn, 7 s past its budget, and reports the budget as its training time. It prints the longest pause its loop saw.
OVERSTAY_TRAIN = '''import os, threading, time
import prepare
fd = int(os.environ["FARM_GATE_FD"])
turn = threading.Event()
threading.Thread(target=lambda: (os.read(fd, 1), turn.set()), daemon=True).start()
last, gap = time.monotonic(), 0.0
def tick():
    global last, gap
    time.sleep(0.02)
    now = time.monotonic()
    gap, last = max(gap, now - last), now
while not turn.is_set():
    tick()
t = time.monotonic()
while time.monotonic() - t < prepare.TIME_BUDGET + 7:
    tick()
print("LONGEST_PAUSE", round(gap, 1), flush=True)
prepare.finish(1.0, steps=1)
'''


def test_two_slots_stop_an_early_run_at_its_limit_and_refuse_one_that_overstays_its_turn(pg_env, tmp_path):
    """With two slots the next candidate starts while the first trains; past the early-start limit (the start-up
    allowance) it is stopped until its turn, so its untimed work beside the timed run is bounded as a lone run's
    start-up is. After its turn the worker's own clocks bound its device time, whatever the harness's clock says."""
    budget, startup = 14.0, 10.0
    with session_scope() as s:
        prog = make_program(s, time_budget=budget)
        honest = make_experiment(s, prog, files={"train.py": FAKE_TRAIN}, seed=1, content_hash="h").id
        cheat = make_experiment(s, prog, files={"train.py": OVERSTAY_TRAIN}, seed=2, content_hash="c").id
    app = make_celery()
    env = worker_env(pg_env, FARM_WORKER_SLOTS="2", FARM_STARTUP_ALLOWANCE=str(startup), FARM_TURN_ALLOWANCE="0")
    with workers(env, ["slots:cpu0"], tmp_path / "logs"):
        publish_experiment(honest, "cpu", time_limit=60, app=app)
        wait_status([honest], [S.running], timeout=30)  # the honest run holds the device first
        publish_experiment(cheat, "cpu", time_limit=60, app=app)
        wait_status([honest, cheat], FINISHED, timeout=90)
    first, second = (rows(Result, experiment_id=i)[0] for i in (honest, cheat))
    assert rows(Experiment, id=honest)[0].status == S.succeeded, first.log_tail
    t1, t2 = first.timings, second.timings
    assert t2["overlapped"] and t2["gate_opened_at"] >= t1["exited_at"] - 0.01, (t1, t2)
    # it ran `startup` seconds beside the first run, then was stopped until the first one exited
    expected_hold = t1["exited_at"] - (t2["spawned_at"] + startup)
    assert expected_hold > 1.5 and abs(t2["held_seconds"] - expected_hold) < 0.6, (expected_hold, t2)
    pause = float(second.log_tail.split("LONGEST_PAUSE")[1].split()[0])
    assert pause >= expected_hold - 0.6, (pause, second.log_tail)  # its own clock saw the stop
    # about 21 s on the device from its turn against 14 + 3 (slack) + 0 + 1 (eval allowance): refused, although
    # it reported 14 s of training; the honest run used its budget and a little more, with its start-up allowance
    exp = rows(Experiment, id=cheat)[0]
    assert exp.status == S.refused and "used the device" in (exp.status_reason or ""), (exp.status_reason, t2)
    assert t2["after_start_seconds"] > budget + 5 and t1["after_start_seconds"] < budget and t1["held_seconds"] == 0
