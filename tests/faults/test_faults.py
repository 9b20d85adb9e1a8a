"""Faults during a running program with two workers (real `farm worker` and `farm scheduler`
processes, Postgres, Redis, the mutation proposer, 3 s budgets). After each: zero lost
experiments, zero duplicate results, git branch == database head; the recovery time is printed
and appended to artifacts/fault_recovery.tsv."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from farm.candidates import Edit, record_proposal
from farm.db import session_scope
from farm.lineage import Lineage
from farm.models import Experiment, ExperimentStatus, Program, Result
from farm.settings import get_settings
from tests.conftest import restart_postgres
from tests.faults.farmkit import FaultFarm, record_recovery
from tests.procs import start_redis, stop_redis
from tests.workerkit import rows

S = ExperimentStatus
W = ("fa:cpu0", "fb:cpu1")
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _running_on(farm: FaultFarm, name: str) -> Experiment | None:
    return next((e for e in farm.experiments() if e.status == S.running and e.worker_id == name), None)


def test_worker_killed_mid_run(farm: FaultFarm) -> None:
    farm.create_program(max_experiments=8)
    farm.start_workers(*W)
    farm.start_scheduler()
    farm.wait_results(2)
    victim = farm.wait("a run in progress on a worker", lambda: _running_on(farm, W[0]))
    farm.wait("the run to be mid-way", lambda: (rows(Experiment, id=victim.id)[0].progress or 0) > 20 or None, 10)
    fault = farm.now()
    farm.kill_worker(W[0])
    again = farm.wait("the interrupted experiment to run again",
                      lambda: farm.first_after(fault, id=victim.id))
    farm.wait_finished()
    farm.stop()
    facts = farm.check_invariants()
    exp = rows(Experiment, id=victim.id)[0]
    assert exp.status == S.succeeded and exp.retry_count == 1 and exp.worker_id == W[1]
    assert [a["worker_id"] for a in exp.attempts] == [W[0]]
    record_recovery("worker_kill9", (again - fault).total_seconds(),
                    "SIGKILL -> the interrupted experiment claimed again by the other worker", str(facts))


def _first_progress(farm: FaultFarm, fault, *columns: str):  # type: ignore[no-untyped-def]
    times = [t for c in columns if (t := farm.first_after(fault, column=c)) is not None]
    return min(times) if times else None


def test_scheduler_killed_and_restarted(farm: FaultFarm) -> None:
    farm.create_program(max_experiments=8)
    farm.start_workers(*W)
    farm.start_scheduler()
    farm.wait_results(3)
    fault = farm.now()
    farm.kill_scheduler()
    farm.start_scheduler()
    back = farm.wait("the restarted scheduler to queue or decide",
                     lambda: _first_progress(farm, fault, "queued_at", "decided_at"))
    farm.wait_finished()
    farm.stop()
    facts = farm.check_invariants()
    record_recovery("scheduler_kill9_restart", (back - fault).total_seconds(),
                    "SIGKILL + restart -> first experiment queued or decided by the new scheduler", str(facts))


def test_redis_restarted_empty(farm: FaultFarm, redis_port: int, tmp_path: Path) -> None:
    farm.create_program(max_experiments=8)
    farm.start_workers(*W)
    farm.start_scheduler()
    farm.wait_results(3)
    down = farm.now()
    stop_redis(redis_port)
    # an experiment the scheduler queues while Redis is down has no message at all (its publish fails
    # after kombu's retries, a few seconds): it runs only if the reconciler re-publishes it. (One queued
    # before the outage may sit in a worker's prefetch and run without help.)
    waiting = farm.wait("an experiment queued while Redis is down", lambda: [
        e.id for e in farm.experiments() if e.status == S.queued and e.queued_at and e.queued_at > down] or None,
        timeout=30)
    time.sleep(5.0)  # past the publish retries
    start_redis(redis_port, tmp_path / "redis")
    fault = farm.now()
    back = max(farm.wait(f"experiment {i} to start after the restart", lambda i=i: farm.first_after(fault, id=i),
                         timeout=90) for i in waiting)
    farm.wait_finished()
    farm.stop()
    facts = farm.check_invariants()
    record_recovery("redis_restart_empty", (back - fault).total_seconds(),
                    "Redis back empty -> the experiments queued during the outage (publish failed) claimed", str(facts))


def _postgres_fault_mid_run(farm: FaultFarm, results_before: int, down_seconds: float = 0.0):  # type: ignore[no-untyped-def]
    """Run a program, take Postgres away while a run trains (restart, or stopped for down_seconds), let the
    program finish; returns (seconds from the fault to the first claim or result after it, invariant facts)."""
    farm.create_program(max_experiments=8)
    farm.start_workers(*W)
    farm.start_scheduler()
    farm.wait_results(results_before)
    farm.wait("a run in progress", lambda: _running_on(farm, W[0]) or _running_on(farm, W[1]))
    fault = farm.now()
    restart_postgres(down_seconds=down_seconds)
    back = farm.wait("a claim or a result after the fault",
                     lambda: _first_progress(farm, fault, "started_at", "finished_at"), timeout=90)
    farm.wait_finished()
    farm.stop()
    return (back - fault).total_seconds(), farm.check_invariants()


def test_postgres_restarted(farm: FaultFarm) -> None:
    seconds, facts = _postgres_fault_mid_run(farm, results_before=3)
    record_recovery("postgres_restart", seconds, "pg_ctl restart -m fast -> first claim or result written afterwards",
                    str(facts))


def test_postgres_down_for_many_heartbeats(farm: FaultFarm) -> None:
    """Postgres stopped for 6 s, six heartbeat intervals, while runs train and end: the workers keep training,
    hold their results until the database is back, and the reapers wait out a grace period before taking
    silence for death. Found by review: the first reaper pass after the outage re-queued every run in flight
    (each then killed, and counted as a retry), and a result whose write failed for ~15 s was dropped."""
    seconds, facts = _postgres_fault_mid_run(farm, results_before=2, down_seconds=6)
    reaped = {e.id: e.attempts for e in farm.experiments() if e.attempts}
    assert not reaped, f"runs reaped though their workers were alive: {reaped}"
    record_recovery("postgres_down_6s", seconds,
                    "pg_ctl stop, 6 s down (6 heartbeat intervals), start -> first claim or result afterwards",
                    str(facts))


FLOOD = '''"""Floods stdout without end: 4 KB lines, a running total every 64 KB."""
import sys

import prepare  # noqa: F401

line = b"flood " + b"x" * 4089 + b"\\n"
written = 0
while True:
    for _ in range(16):
        sys.stdout.buffer.write(line)
    written += 16 * len(line)
    sys.stdout.buffer.write(b"flood: %d MB written\\n" % (written >> 20))
'''


def test_candidate_flooding_stdout(farm: FaultFarm) -> None:
    farm.create_program(max_experiments=10)
    farm.start_workers(*W)
    farm.start_scheduler()
    farm.wait_results(2)
    p = farm.program()
    assert p.head_commit
    head = Lineage(get_settings().repo_dir).files_at(p.head_commit, ["train.py"])
    with session_scope() as s:
        prog = s.get(Program, farm.program_id)
        assert prog is not None
        exp = record_proposal(s, prog, parent_commit=p.head_commit, base_files=head,
                              edit=Edit(files={"train.py": FLOOD}), proposer_kind="manual",
                              description="flood stdout")
        assert exp.status == S.proposed, exp.status_reason
        flood_id = exp.id
    done = farm.wait("the flood to end", lambda: (e := rows(Experiment, id=flood_id)[0]).status.finished
                     and e or None, timeout=60)
    name = done.worker_id
    assert done.status == S.timed_out, (done.status, done.status_reason)
    assert name and farm.workers[name].poll() is None  # the worker lives on
    res = rows(Result, experiment_id=flood_id)[0]
    cap = 1 << 20
    log = get_settings().logs_dir / f"experiment-{flood_id}-r0.log"
    assert res.timings["log_truncated"] is True and res.timings["log_bytes"] <= cap
    assert log.stat().st_size <= cap + 200
    assert not list(get_settings().workdirs.glob(f"*-e{flood_id}-*"))  # workdir removed
    written = max(int(ln.split()[1]) for ln in res.log_tail.splitlines() if ln.startswith("flood:"))
    back = farm.wait("the same worker to take the next job",
                     lambda: farm.first_after(done.finished_at, worker_id=name))
    farm.wait_finished()
    farm.stop()
    facts = farm.check_invariants()
    record_recovery("stdout_flood", (back - done.finished_at).total_seconds(),
                    "flood run killed at the wall limit -> same worker claims its next job",
                    f"{written} MB emitted in {res.timings['child_seconds']:.1f}s, log {log.stat().st_size} B; "
                    f"{facts}")


def test_worker_clock_an_hour_ahead(farm: FaultFarm) -> None:
    # the monotonic clock is shifted too: with FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 makes
    # Python 3.11's time.sleep fail with EINVAL (its clock_nanosleep wrapper); a constant shift of the
    # monotonic clock changes no duration, so the fault is the same: a wall clock an hour ahead
    skew = {"FAKETIME": "+1h", "LD_PRELOAD": FAKETIME_LIB}
    probe = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.01); print(time.time())"], env={**os.environ, **skew},
                           capture_output=True, text=True, check=True)
    ahead = float(probe.stdout) - time.time()
    assert 3500 < ahead < 3700, ahead  # the fault is real
    farm.create_program(max_experiments=10)
    farm.start_workers(W[0])
    fault = farm.now()
    farm.start_workers(W[1], **skew)
    farm.start_scheduler()
    first = farm.wait("the skewed worker's first result",
                      lambda: farm.first_after(fault, column="finished_at", worker_id=W[1]))
    farm.wait_finished()
    farm.stop()
    facts = farm.check_invariants()
    exps = farm.experiments()
    assert facts["retries"] == 0 and not any(e.attempts for e in exps), "a live run was reaped"
    assert {e.worker_id for e in exps if e.status == S.succeeded} == set(W)
    record_recovery("worker_clock_plus_1h", (first - fault).total_seconds(),
                    "skewed worker started -> its first result (no run reaped)", str(facts))
