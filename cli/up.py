"""`farm up`: the whole farm on this machine, as child processes of one command.

Order: migrate the database, make sure an API token exists (print it once), start the API, the
scheduler and one worker per visible GPU (or CPU workers), print the dashboard address, wait.

Each child runs in its own process group with its log in FARM_HOME/logs/<name>.log, so a Ctrl-C
in the terminal reaches `farm up` only, and `farm up` decides how the children stop: SIGTERM to
every group, a grace period, then SIGKILL to whatever is left (a second Ctrl-C skips the wait).
`farm up` makes itself the "child subreaper" (Linux), so a training run whose worker died is
re-parented here rather than to init, and is killed instead of burning a core for nobody; every
poll also reaps whatever re-parented process has exited (no zombies pile up on a long-running farm).

A child that exits while the farm is running is restarted with a visible message; one that dies
more than MAX_RESTARTS times within RESTART_WINDOW seconds stops the farm with exit code 1.
Nothing is restarted silently. State lives in the database, so a restarted worker (or a
restarted `farm up`) loses nothing: the reaper re-queues the experiment the dead worker held.

`cli/demo.py` drives the same `Farm` object.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import typer
from pydantic import SecretStr

from cli.errors import CLIError
from farm.settings import Settings, get_settings, mask_url

ROOT = Path(__file__).resolve().parent.parent
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0
DEFAULT_GRACE = 45.0  # above a worker's FARM_STOP_EVAL_GRACE (30 s): an evaluation under way finishes
TOKEN_FILE = "api-token"
TOKEN_NAME = "farm-up"
_PR_SET_CHILD_SUBREAPER = 36


def say(message: str, *, err: bool = False) -> None:
    print(f"farm up: {message}", file=sys.stderr if err else sys.stdout, flush=True)


# ---------------------------------------------------------------- preparation

def migrate_database(settings: Settings) -> str:
    """`farm db upgrade` logic: check the database is reachable, migrate to head."""
    from farm import migrate
    from farm.db import check_connection, make_engine

    url = settings.db_url
    engine = make_engine(url)
    try:
        check_connection(engine)
    finally:
        engine.dispose()
    migrate.upgrade(url)
    return migrate.current(url) or "base"


@dataclass(frozen=True)
class TokenInfo:
    plain: str | None  # None: tokens exist but this command does not know one
    created: bool
    source: str  # "FARM_API_TOKEN" | "created" | "token file" | "none"


def ensure_api_token(settings: Settings) -> TokenInfo:
    """Honour FARM_API_TOKEN (registering it if the database does not know it yet); otherwise
    reuse the token `farm up` created earlier (FARM_HOME/api-token), or create the first one."""
    from sqlalchemy import select

    from farm.db import session_scope
    from farm.models import ApiToken
    from farm.tokens import create_token, hash_token, plain_token_problem, verify_token

    token_file = settings.home / TOKEN_FILE
    plain = settings.api_token.get_secret_value().strip()
    with session_scope() as session:
        if plain:
            if len(plain) < 16:
                raise CLIError("FARM_API_TOKEN is shorter than 16 characters; use a random token "
                               "(`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            # a token verify_token refuses unread (over 200 characters, non-ASCII) was registered, then reported
            # as "a revoked token" while `farm token list` showed it active (found by review)
            problem = plain_token_problem(plain)
            if problem is not None:
                raise CLIError(f"FARM_API_TOKEN {problem}, so no request could use it; use a random token "
                               "(`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            if verify_token(session, plain=plain) is None:
                known = session.execute(select(ApiToken.id).where(ApiToken.token_hash == hash_token(plain))).first()
                if known is not None:
                    raise CLIError("FARM_API_TOKEN names a revoked token")
                session.add(ApiToken(name=_free_token_name(session, "farm-api-token"),
                                     token_hash=hash_token(plain), prefix=plain[:10]))
            return TokenInfo(plain, False, "FARM_API_TOKEN")
        if token_file.is_file():
            saved = token_file.read_text().strip()
            if saved and verify_token(session, plain=saved) is not None:
                return TokenInfo(saved, False, "token file")
        live = session.execute(select(ApiToken.id).where(ApiToken.revoked.is_(False))).first()
        if live is not None:
            return TokenInfo(None, False, "none")
        new = create_token(session, name=_free_token_name(session, TOKEN_NAME))
        plain = new.plain
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plain + "\n")
    return TokenInfo(plain, True, "created")


def _free_token_name(session: Any, base: str) -> str:
    from sqlalchemy import select

    from farm.models import ApiToken

    taken = set(session.execute(select(ApiToken.name)).scalars())
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def visible_gpus() -> int:
    """How many CUDA devices this process may use (CUDA_VISIBLE_DEVICES respected)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def port_in_use(host: str, port: int) -> bool:
    # create_connection tries every address the host resolves to, IPv6 included (FARM_API_HOST=::1);
    # a host that does not resolve has nothing listening on it as far as this check can tell
    try:
        with socket.create_connection((_connect_host(host), port), timeout=0.5):
            return True
    except OSError:
        return False


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def dashboard_url(settings: Settings) -> str:
    host = _connect_host(settings.api_host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.api_port}/"


# ---------------------------------------------------------------- children

@dataclass
class ChildSpec:
    name: str
    args: list[str]  # arguments of the `farm` command, e.g. ["worker", "--cpu"]
    command: list[str] | None = None  # a whole command line instead (tests)
    worker_id: str | None = None  # the id `farm worker` registers under (HOST:cpuN / HOST:gpuN)

    def argv(self) -> list[str]:
        return list(self.command) if self.command else [sys.executable, "-m", "cli.main", *self.args]


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    log: TextIO | None = None
    deaths: deque[float] = field(default_factory=deque)
    starts: int = 0


def _nvidia_smi_uuids() -> dict[str, int]:
    """GPU UUID -> nvidia-smi index (empty when nvidia-smi is missing or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split(",", 1) for line in out.splitlines() if "," in line)
    return {uuid.strip(): int(index) for index, uuid in pairs if index.strip().isdigit()}


def gpu_ids(count: int) -> list[int]:
    """The physical ids of the visible GPUs: `farm worker --gpu N` takes nvidia-smi's numbering,
    so CUDA_VISIBLE_DEVICES=2,3 (or those GPUs' UUIDs) must give workers 2 and 3, not 0 and 1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "")
    parts = [p for p in visible.split(",") if p]
    if not parts:
        return list(range(count))
    if all(p.isdigit() for p in parts):
        return [int(p) for p in parts][:count]
    uuids = _nvidia_smi_uuids()
    ids = []
    for p in parts[:count]:
        match = [i for uuid, i in uuids.items() if uuid == p or (p.startswith("GPU-") and uuid.startswith(p))]
        if p.isdigit():
            ids.append(int(p))
        elif len(match) == 1:
            ids.append(match[0])
        else:  # a MIG instance, or a UUID nvidia-smi does not list: guessing would pin the wrong GPU
            raise CLIError(f"CUDA_VISIBLE_DEVICES names {p!r}, which is not a GPU nvidia-smi lists by UUID; "
                           f"start `farm worker --gpu N` per GPU instead (N: nvidia-smi's index)")
    return ids


def child_specs(settings: Settings, *, cpu: bool, workers: int, gpus: int | None = None) -> list[ChildSpec]:
    host = socket.gethostname()
    specs = [ChildSpec("api", ["api"]), ChildSpec("scheduler", ["scheduler"])]
    n_gpu = 0 if cpu else (visible_gpus() if gpus is None else gpus)
    if n_gpu:
        specs += [ChildSpec(f"worker-gpu{i}", ["worker", "--gpu", str(i)], worker_id=f"{host}:gpu{i}")
                  for i in gpu_ids(n_gpu)]
    else:
        specs += [ChildSpec(f"worker-cpu{i}", ["worker", "--cpu", "--slot", str(i)], worker_id=f"{host}:cpu{i}")
                  for i in range(max(1, workers))]
    return specs


def release_interrupted(worker_ids: set[str], settings: Settings | None = None) -> list[int]:
    """Put the runs our (now dead) workers were in the middle of back in the queue, without
    spending a retry: stopping the farm is not the candidate's fault. Call only once those
    workers' process trees are gone. Returns the released experiment ids."""
    from farm.recovery import release_runs

    return release_runs(worker_ids, reason="farm up stopped its worker; re-queued without counting a retry",
                        stop_workers=True, settings=settings)


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the FARM_* variable that gives it back. Environment variables win over a .env file,
    and settings read .env from the current directory: the children start in the repository, so without
    these a .env where `farm up` was typed (FARM_API_PORT, FARM_DATABASE_URL) reached this process only."""
    from sqlalchemy.engine import make_url

    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"FARM_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        # a relative SQLite path means the caller's directory, not the child's
        url = url.set(database=str(Path(url.database).resolve()))
    env["FARM_DATABASE_URL"] = url.render_as_string(hide_password=False)
    return env


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # the children must see the same farm as this process, whatever their working directory
    env.update(settings_env(settings))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _child_states(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their state letter ("R", "S", "Z": a zombie...), from /proc (Linux);
    empty where /proc is unavailable."""
    out: dict[int, str] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            state, ppid = fields[0], int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out[int(entry)] = state
    return out


def _children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux); empty where /proc is unavailable."""
    return list(_child_states(pid))


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    stack = [pid]
    while stack:
        for child in _children_of(stack.pop()):
            if child not in seen:
                seen.append(child)
                stack.append(child)
    return seen


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Farm:
    """The children of `farm up`, started, watched and stopped together."""

    def __init__(self, settings: Settings, specs: list[ChildSpec], *, grace: float = DEFAULT_GRACE,
                 echo: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.children = [Child(spec) for spec in specs]
        self.grace = grace
        self.echo = echo or (lambda msg: say(msg, err=True))
        self.env = child_env(settings)
        self.failed: str | None = None  # set when a child died too often
        self.stopping = False
        self.subreaper = _become_subreaper()

    # -- lifecycle
    def start(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        if child.log is None or child.log.closed:
            child.log = open(self.settings.logs_dir / f"{child.spec.name}.log", "a", buffering=1)  # noqa: SIM115
        child.log.write(f"\n===== farm up: starting {child.spec.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        child.proc = subprocess.Popen(
            child.spec.argv(), cwd=str(ROOT), env=self.env,
            stdin=subprocess.DEVNULL, stdout=child.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # own session and process group: the terminal's Ctrl-C is ours
        child.starts += 1

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None}

    def worker_ids(self) -> set[str]:
        return {c.spec.worker_id for c in self.children if c.spec.worker_id}

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.spec.name == name:
                return c
        raise KeyError(name)

    def poll(self) -> bool:
        """Check every child once; restart the dead ones. False once the farm must stop."""
        if self.stopping:
            return False
        self._reap_zombies()
        for child in self.children:
            proc = child.proc
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode
            now = time.monotonic()
            child.deaths.append(now)
            while child.deaths and now - child.deaths[0] > RESTART_WINDOW:
                child.deaths.popleft()
            tail = self.log_tail(child.spec.name, 8)
            self._kill_orphans()
            if len(child.deaths) > MAX_RESTARTS:
                self.failed = (f"{child.spec.name} exited with code {code} {len(child.deaths)} times in "
                               f"{RESTART_WINDOW / 60:g} min; stopping the farm")
                self.echo(self.failed)
                if tail:
                    self.echo(f"last lines of {self.settings.logs_dir / (child.spec.name + '.log')}:\n{tail}")
                return False
            self.echo(f"{child.spec.name} exited with code {code}; restarting it "
                      f"(restart {len(child.deaths)} of {MAX_RESTARTS} in {RESTART_WINDOW / 60:g} min)")
            if tail:
                self.echo(f"last lines of its log:\n{tail}")
            self._spawn(child)
        return True

    def log_tail(self, name: str, lines: int) -> str:
        path = self.settings.logs_dir / f"{name}.log"
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in text.rstrip().splitlines()[-lines:])

    def _managed_pids(self) -> set[int]:
        return {c.proc.pid for c in self.children if c.proc is not None}

    def _reap_zombies(self) -> None:
        """Collect the exit status of processes re-parented to us that have exited (a sandboxed run's
        bwrap whose intermediate parent exited first): as the subreaper we are their parent, and nobody
        else waits for them, so without this each one stays a zombie for as long as `farm up` runs.
        Our own children are left alone (by pid, never waitpid(-1)): their Popen must see their status."""
        if not self.subreaper:
            return
        ours = self._managed_pids()
        for pid, state in _child_states(os.getpid()).items():
            if state == "Z" and pid not in ours:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def _kill_orphans(self) -> None:
        """Grandchildren re-parented to us (their worker died) are killed: nobody will report them."""
        if not self.subreaper:
            return
        ours = self._managed_pids()
        for pid in _children_of(os.getpid()):
            if pid in ours:
                continue
            for p in [*descendants(pid), pid]:
                _kill(p, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)

    def stop(self, *, grace: float | None = None, force: Callable[[], bool] | None = None) -> dict[str, int | None]:
        """SIGTERM every child's group, wait up to `grace` seconds (less if `force()` turns true),
        then SIGKILL what is left, including descendants that left the group. Returns exit codes."""
        self.stopping = True
        grace = self.grace if grace is None else grace
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        # the whole tree, collected before anything exits (orphans re-parent and become hard to find)
        tree = {c.spec.name: descendants(c.proc.pid) for c in live if c.proc is not None}
        for c in live:
            assert c.proc is not None
            _killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc is not None and c.proc.poll() is None for c in live):
            if force is not None and force():
                break
            time.sleep(0.1)
        for c in live:
            assert c.proc is not None
            if c.proc.poll() is None:
                self.echo(f"{c.spec.name} did not stop within {grace:g}s; killing it")
                _killpg(c.proc.pid, signal.SIGKILL)
            for pid in tree.get(c.spec.name, []) + descendants(c.proc.pid):
                _kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=10)
        self._kill_orphans()
        codes: dict[str, int | None] = {}
        for c in self.children:
            codes[c.spec.name] = c.proc.returncode if c.proc is not None else None
            if c.log is not None and not c.log.closed:
                c.log.write(f"===== farm up: {c.spec.name} stopped ({codes[c.spec.name]})\n")
                c.log.close()
        return codes

    def wait_for_api(self, timeout: float = 60.0, cancel: Callable[[], bool] = lambda: False) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancel():
            if port_in_use(self.settings.api_host, self.settings.api_port):
                return True
            api = next((c for c in self.children if c.spec.name == "api"), None)
            if api is None or (api.proc is not None and api.proc.poll() is not None):
                return False
            time.sleep(0.2)
        return False


class StopSignal:
    """SIGINT/SIGTERM handler: the first asks for a clean stop, the second for an immediate one."""

    def __init__(self) -> None:
        self.count = 0
        self.signame = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.signame = signal.Signals(signum).name
        if self.count == 1:
            say(f"{self.signame}: stopping the farm (again to kill at once)", err=True)

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def forced(self) -> bool:
        return self.count > 1


def prepare(settings: Settings, *, quiet: bool = False) -> TokenInfo:
    """Everything `farm up` does before starting children: directories, migrations, token."""
    for d in (settings.home, settings.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    revision = migrate_database(settings)
    if not quiet:
        say(f"database {mask_url(settings.db_url)} at revision {revision}")
    return ensure_api_token(settings)


def no_other_scheduler(settings: Settings) -> None:
    """SchedulerLockHeld, at once, when another scheduler runs on this farm's database (a `farm up` pointed at the
    head's Postgres from a worker box): its own scheduler would exit on the lock, be restarted five times beside a
    running API and workers, and only then stop the farm (found by review)."""
    from farm.db import SchedulerLock, check_connection, get_engine

    check_connection(get_engine())  # unreachable: one line (DatabaseUnavailable), not the lock's traceback
    lock = SchedulerLock(get_engine())
    try:
        lock.acquire()  # SchedulerLockHeld names where the running one connects from
    finally:
        lock.release()


def print_token(info: TokenInfo, settings: Settings) -> None:
    if info.created:
        say(f"created the first API token (shown once; also kept in {settings.home / TOKEN_FILE}):")
        print(f"\n    export FARM_API_TOKEN={info.plain}\n", flush=True)
    elif info.source == "token file":
        say(f"API token (from {settings.home / TOKEN_FILE}): export FARM_API_TOKEN={info.plain}")
    elif info.source == "FARM_API_TOKEN":
        say("API token: the one in FARM_API_TOKEN")
    else:
        say("API tokens exist but FARM_API_TOKEN is not set: create one with `farm token create NAME`")


def exit_text(code: int | None) -> str:
    """`0` -> ok, `-15` -> SIGTERM (uvicorn re-raises the signal it stopped on), else the code."""
    if code is None:
        return "not started"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return "ok" if code == 0 else f"exit {code}"


def run_up(*, cpu: bool, workers: int, grace: float) -> int:
    settings = get_settings()
    if port_in_use(settings.api_host, settings.api_port):
        raise CLIError(f"port {settings.api_port} on {settings.api_host} is already in use (another `farm up`?); "
                       "stop it or set FARM_API_PORT")
    no_other_scheduler(settings)
    info = prepare(settings)
    print_token(info, settings)
    specs = child_specs(settings, cpu=cpu, workers=workers)
    farm = Farm(settings, specs, grace=grace)
    with StopSignal() as stop:
        farm.start()
        say(f"started {', '.join(f'{n} (pid {p})' for n, p in farm.pids().items())}; logs in {settings.logs_dir}")
        if not settings.embedded:
            say(f"database {mask_url(settings.db_url)}, broker {mask_url(settings.broker)}")
        if farm.wait_for_api(cancel=lambda: stop.requested):
            say(f"dashboard: {dashboard_url(settings)}   (Ctrl-C stops the farm)")
        elif not stop.requested:
            say("the API did not come up; see its log", err=True)
        while not stop.requested and farm.poll():
            time.sleep(0.5)
        codes = farm.stop(force=lambda: stop.forced)
    released = release_interrupted(farm.worker_ids(), settings)
    if released:
        say(f"re-queued the interrupted run(s) {', '.join(map(str, released))}; they restart with the next `farm up`")
    if farm.failed:
        say(farm.failed, err=True)
        return 1
    say("stopped: " + ", ".join(f"{n} ({exit_text(c)})" for n, c in codes.items()))
    return 0


def up(
    cpu: bool = typer.Option(False, "--cpu", help="CPU workers even when GPUs are visible."),
    workers: int = typer.Option(1, "--workers", min=1, help="Number of CPU workers (without GPUs or with --cpu)."),
    grace: float = typer.Option(DEFAULT_GRACE, "--grace", min=0.0,
                                help="Seconds children get to stop on Ctrl-C before they are killed."),
) -> None:
    """Run the API + dashboard, the scheduler and the workers on this machine until Ctrl-C."""
    raise typer.Exit(run_up(cpu=cpu, workers=workers, grace=grace))
