"""Helpers for the worker tests: real `farm worker` processes against a farm home, and waits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, Worker
from tests.procs import stop_process

ROOT = Path(__file__).resolve().parent.parent
FAKE_TEMPLATE = ROOT / "tests" / "fake_template"
FAKE_TRAIN = (FAKE_TEMPLATE / "train.py").read_text()

# short everything: 1 s heartbeats (reaped after 2 s), 1 s startup/eval allowances
WORKER_ENV = {"FARM_TEMPLATE_DIR": str(FAKE_TEMPLATE), "FARM_HEARTBEAT_INTERVAL": "1",
              "FARM_STARTUP_ALLOWANCE": "1", "FARM_EVAL_ALLOWANCE": "1", "FARM_WORKER_MEMORY_MB": "300",
              "FARM_LOG_CAP_MB": "1", "PYTHONUNBUFFERED": "1"}


def isolated_fake_template(dest: Path) -> Path:
    """A copy of the fake template whose harness declares the isolated evaluation (farm/harness.py's marker): the
    worker exports the run's model and scores it with `prepare.py --evaluate` in a second process."""
    from farm.harness import ISOLATED_MARKER

    shutil.copytree(FAKE_TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    with open(dest / "prepare.py", "a") as f:
        f.write(f"\n{ISOLATED_MARKER}\n")
    return dest


def worker_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_") or k.startswith("FARM_TEST_")}
    env.update(WORKER_ENV)
    env.update(base)
    env.update(extra)
    return env


def start_worker(env: dict[str, str], name: str, log_dir: Path, *, slot: int = 0) -> subprocess.Popen[bytes]:
    """`farm worker --cpu` as a subprocess (exec'd into celery: its pid is the worker's)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name.replace(':', '_')}.log", "ab")  # noqa: SIM115 - lives with the process
    return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--cpu", "--slot", str(slot), "--name", name,
                             "--loglevel", "INFO"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    stop_process(proc, timeout)


@contextmanager
def workers(env: dict[str, str], names: Iterable[str], log_dir: Path, engine: Engine | None = None,
            timeout: float = 60) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_worker(env, n, log_dir, slot=i) for i, n in enumerate(names)]
    try:
        for n, p in zip(names, procs, strict=True):
            wait_registered(n, p, log_dir, timeout, engine)
        yield procs
    finally:
        for p in procs:
            stop_worker(p)


def wait_registered(name: str, proc: subprocess.Popen[bytes], log_dir: Path, timeout: float,
                    engine: Engine | None = None) -> Worker:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker {name} exited {proc.returncode}: {worker_log(log_dir, name)[-3000:]}")
        with session_scope(engine) as s:
            w = s.get(Worker, name)
            if w is not None and w.pid == proc.pid and w.stopped_at is None:
                s.expunge(w)
                time.sleep(0.3)  # registration happens just before the consumer starts
                return w
        time.sleep(0.2)
    raise AssertionError(f"worker {name} did not register in {timeout}s: {worker_log(log_dir, name)[-3000:]}")


def worker_log(log_dir: Path, name: str) -> str:
    p = log_dir / f"{name.replace(':', '_')}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def wait_status(ids: Iterable[int], statuses: Iterable[ExperimentStatus], timeout: float,
                engine: Engine | None = None) -> dict[int, ExperimentStatus]:
    ids, want = list(ids), set(statuses)
    deadline = time.monotonic() + timeout
    seen: dict[int, ExperimentStatus] = {}
    while time.monotonic() < deadline:
        with session_scope(engine) as s:
            seen = dict(s.execute(select(Experiment.id, Experiment.status).where(Experiment.id.in_(ids))).all())
        if all(seen.get(i) in want for i in ids):
            return seen
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {sorted(w.value for w in want)}: {seen}")


FINISHED = [ExperimentStatus.succeeded, ExperimentStatus.crashed, ExperimentStatus.timed_out,
            ExperimentStatus.refused, ExperimentStatus.lost]


def rows(model: Any, engine: Engine | None = None, **where: Any) -> list[Any]:
    with session_scope(engine) as s:
        out = list(s.execute(select(model).filter_by(**where)).scalars().all())
        for o in out:
            s.expunge(o)
        return out
