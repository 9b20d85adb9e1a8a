"""A worker process's life: start-up (identity, sandbox probe, data cache, `workers` row, reaper
thread) and shutdown. Celery's worker signals call these (worker/app.py); tests and the benchmark
call them directly.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from farm.db import session_scope
from farm.recovery import note_database_failure, reap_and_requeue
from farm.settings import Settings, get_settings
from worker import disk, identity
from worker.gate import DeviceGate
from worker.runner import (
    NOT_PASSED_ON,
    PREPARE_PASSTHROUGH,
    Limits,
    WorkerContext,
    child_env_base,
    corpus_folder,
    replay_pending,
)
from worker.sandbox import probe
from worker.workdir import template_dir

log = logging.getLogger(__name__)

_ctx: WorkerContext | None = None
_stop = threading.Event()


class StartupError(RuntimeError):
    pass


def build_context(settings: Settings | None = None, slots: int | None = None) -> WorkerContext:
    """`slots`: the jobs this process runs at once (Celery's concurrency); default FARM_WORKER_SLOTS, else 2 on a
    GPU and 1 on a CPU."""
    s = settings or get_settings()
    ident = identity.detect()
    s.home.mkdir(parents=True, exist_ok=True)
    sandbox = probe(s.sandbox)
    slots = slots or s.worker_slots or (1 if ident.gpu_index is None else 2)
    return WorkerContext(settings=s, identity=ident, sandbox=sandbox, limits=Limits.from_settings(s), slots=slots,
                         gate=DeviceGate() if slots > 1 else None)


def _prepare_py(ctx: WorkerContext, args: list[str], profile: str | None, timeout: float,
                stdout: Any, stderr: Any = subprocess.STDOUT) -> subprocess.CompletedProcess[bytes]:
    """`python prepare.py ARGS` from a copy of the template, outside the sandbox, with a run's environment."""
    template = template_dir()
    if not (template / "prepare.py").is_file():
        raise StartupError(f"no prepare.py in the template at {template}")
    profile = profile or ("cpu" if ctx.identity.gpu_index is None else "h100")
    with tempfile.TemporaryDirectory(prefix="farm-prepare-") as tmp:
        work = Path(tmp) / "t"
        shutil.copytree(template, work, ignore=shutil.ignore_patterns("__pycache__", "data"))
        env = child_env_base(ctx, profile=profile, workdir=work)
        env.update({k: os.environ[k] for k in PREPARE_PASSTHROUGH if k in os.environ})
        return subprocess.run([ctx.python, "prepare.py", *args], cwd=work, env=env, stdout=stdout,
                              stderr=stderr, timeout=timeout, check=False)


def pin_corpus(ctx: WorkerContext, timeout: float = 600.0) -> None:
    """A folder corpus (FARM_CORPUS=/path): ask the template for its cache's name once, so that runs find the cache
    by that name (FARM_CORPUS_ID) with the folder hidden from them (worker/runner.py): the val and test text is in
    it. Every run of this worker then uses the cache of the folder as it was at start-up."""
    if corpus_folder() is None:
        return
    proc = _prepare_py(ctx, ["--corpus-id"], None, timeout, subprocess.PIPE, subprocess.PIPE)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    pinned = lines[-1].strip() if lines else ""
    if proc.returncode != 0 or not re.fullmatch(r"dir-[0-9a-f]{12}", pinned):
        said = (proc.stderr.decode(errors="replace").strip().splitlines() + lines)[-5:]
        raise StartupError(f"prepare.py --corpus-id for FARM_CORPUS={corpus_folder()} failed (exit code "
                           f"{proc.returncode}, printed {pinned!r}): {' | '.join(said)}")
    ctx.corpus_id = pinned
    log.info("worker %s: folder corpus %s, cache %s", ctx.worker_id, corpus_folder(), ctx.corpus_id)


def prepare_data(ctx: WorkerContext, profile: str | None = None, timeout: float = 3600.0) -> None:
    """Run the template's `python prepare.py` once, outside the sandbox (it may download), so the
    sandboxed runs find the data and tokenizer cache ready and can have it read-only."""
    ctx.settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = ctx.settings.logs_dir / f"prepare-{ctx.slug}.log"
    with open(log_path, "wb") as out:
        proc = _prepare_py(ctx, [], profile, timeout, out)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise StartupError(f"prepare.py failed with exit code {proc.returncode}: {' | '.join(tail)} "
                           f"(log: {log_path})")


def _reaper_loop(ctx: WorkerContext, every: float) -> None:
    while not _stop.wait(every):
        try:
            # an idle worker is alive too: without this its row goes stale between jobs and the
            # scheduler, which counts live workers to size the queue, stops feeding it
            with session_scope() as s:
                identity.touch(s, ctx.worker_id)
            reap_and_requeue(settings=ctx.settings)
        except DBAPIError as exc:
            # the touch failed before the reap could notice the outage itself: without this the first tick after
            # the database came back took every run whose heartbeats failed meanwhile for dead and re-queued it
            note_database_failure()
            log.warning("reaper: database unreachable: %s", str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - the reaper must outlive database hiccups
            log.warning("reaper: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def start(settings: Settings | None = None, *, prepare: bool = True, reaper: bool = True,
          slots: int | None = None) -> WorkerContext:
    """Everything a worker does before it takes its first job."""
    global _ctx
    ctx = build_context(settings, slots)
    if not ctx.sandbox.ok:
        banner = "!" * 78
        msg = (f"\n{banner}\nWORKER {ctx.worker_id}: SANDBOX NOT AVAILABLE ({ctx.sandbox.describe()}).\n"
               f"Candidates (LLM-written code) will run with this worker's access to the network and files.\n"
               f"See docs/workers.md to grant bubblewrap what it needs.\n{banner}")
        log.error(msg)
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info("worker %s: sandbox %s", ctx.worker_id, ctx.sandbox.describe())
    ignored = [k for k in NOT_PASSED_ON if k in os.environ]
    if ignored:  # a person who set them expects runs to see them: say they do not, once, at start
        log.warning("worker %s: %s set in this worker's environment: runs do not see %s (the worker sets a run's "
                    "profile, budget and seed from its program and job, and leaves the evaluation and kernels at "
                    "the template's settings so every worker's results compare; docs/deploy.md)",
                    ctx.worker_id, ", ".join(ignored), "it" if len(ignored) == 1 else "them")
    disk.sweep_workdirs(ctx.settings.workdirs, ctx.slug)
    disk.trim_compile_cache(ctx.compile_cache, ctx.limits.compile_cache_mb)
    pin_corpus(ctx)
    if prepare:
        prepare_data(ctx)
    with session_scope() as s:
        identity.register(s, ctx.identity, sandbox=ctx.sandbox.describe(), sandbox_ok=ctx.sandbox.ok,
                          slots=ctx.slots, heartbeat_interval=ctx.settings.heartbeat_interval)
    replay_pending(ctx)  # results a shutdown during a database outage left on disk
    if reaper:
        _stop.clear()
        threading.Thread(target=_reaper_loop, args=(ctx, ctx.settings.heartbeat_interval), daemon=True,
                         name="reaper").start()
    _ctx = ctx
    return ctx


def context() -> WorkerContext:
    """The started worker's context (started on first use where no signal ran start())."""
    return _ctx if _ctx is not None else start()


def shutting_down(how: str = "Warm") -> None:
    """SIGTERM / Ctrl-C (Celery's warm shutdown, worker/app.py): the runs in flight stop within a moment and are
    handed back (worker/runner.py _hand_back) instead of running on into the container's kill; an isolated
    evaluation under way finishes first, within FARM_STOP_EVAL_GRACE. A second signal, or Celery's cold shutdown,
    stops that too. Runs from a signal handler: it only sets fields."""
    if _ctx is not None:
        if _ctx.stopping or how != "Warm":
            _ctx.stop_now = True
        if _ctx.stopping_since is None:
            _ctx.stopping_since = time.monotonic()  # before `stopping`: a reader that sees it set finds the time
        _ctx.stopping = True


def stop() -> None:
    _stop.set()
    if _ctx is not None:
        try:
            with session_scope() as s:
                identity.mark_stopped(s, _ctx.worker_id)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("could not mark worker stopped: %s", exc)
