"""`farm up`'s machinery without the services: the first API token, which children it starts, and
the supervisor (restart with a message, give up after too many deaths, stop a whole process tree
including a grandchild that left its group, kill the orphans of a dead child)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cli import up
from cli.errors import CLIError
from farm.settings import Settings

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# a child that starts a grandchild in its own session (as the worker does with a training run)
# and records its pid, then sleeps
SPAWNER = [sys.executable, "-c",
           "import subprocess, sys, time, os;"
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True);"
           "open(os.environ['GRANDCHILD_FILE'], 'w').write(str(p.pid));"
           "time.sleep(120)"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def _no_lingering_subreaper():  # type: ignore[no-untyped-def]
    # a Farm makes its process a child subreaper; undo it so later tests see normal re-parenting
    yield
    import ctypes

    ctypes.CDLL(None).prctl(up._PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def settings(farm_env: dict[str, str]) -> Settings:
    return Settings()


@pytest.fixture
def migrated(settings: Settings) -> Settings:
    up.migrate_database(settings)
    return settings


def test_first_token_is_created_once_then_reused(migrated: Settings) -> None:
    first = up.ensure_api_token(migrated)
    assert first.created and first.plain and first.source == "created"
    token_file = migrated.home / up.TOKEN_FILE
    assert token_file.read_text().strip() == first.plain
    assert token_file.stat().st_mode & 0o777 == 0o600
    again = up.ensure_api_token(migrated)
    assert not again.created and again.plain == first.plain and again.source == "token file"


def test_farm_api_token_is_honoured_and_registered(migrated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.db import session_scope
    from farm.tokens import verify_token

    plain = "rf_" + "x" * 40
    s = migrated.model_copy(update={"api_token": migrated.api_token.__class__(plain)})
    info = up.ensure_api_token(s)
    assert info.plain == plain and not info.created and info.source == "FARM_API_TOKEN"
    with session_scope() as session:
        assert verify_token(session, plain=plain) is not None
    assert up.ensure_api_token(s).plain == plain  # idempotent
    assert not (migrated.home / up.TOKEN_FILE).exists()


def test_existing_tokens_without_a_known_one_create_nothing(migrated: Settings) -> None:
    from farm.db import session_scope
    from farm.tokens import create_token, list_tokens

    with session_scope() as session:
        create_token(session, name="someone")
    info = up.ensure_api_token(migrated)
    assert info.plain is None and not info.created
    with session_scope() as session:
        assert len(list_tokens(session)) == 1


def test_short_farm_api_token_refused(migrated: Settings) -> None:
    s = migrated.model_copy(update={"api_token": migrated.api_token.__class__("short")})
    with pytest.raises(up.CLIError, match="16 characters"):
        up.ensure_api_token(s)


def test_a_farm_api_token_no_request_can_carry_is_refused(migrated: Settings) -> None:
    """Found by review: `farm up` registered a FARM_API_TOKEN over 200 characters, which verify_token refuses unread,
    then said it "names a revoked token" while `farm token list` showed it active."""
    from farm.db import session_scope
    from farm.tokens import list_tokens

    for plain, why in (("rf_" + "x" * 250, "is longer than 200 characters"),
                       ("rf_abcdefghijklmnop…", r"contains a non-ASCII character \(U\+2026 at position 20\)")):
        s = migrated.model_copy(update={"api_token": migrated.api_token.__class__(plain)})
        with pytest.raises(up.CLIError, match=f"^FARM_API_TOKEN {why}, so no request could use it"):
            up.ensure_api_token(s)
    with session_scope() as session:
        assert list_tokens(session) == []


def test_children_one_worker_per_gpu_or_cpu_workers(settings: Settings) -> None:
    names = [c.name for c in up.child_specs(settings, cpu=False, workers=1, gpus=3)]
    assert names == ["api", "scheduler", "worker-gpu0", "worker-gpu1", "worker-gpu2"]
    gpu1 = up.child_specs(settings, cpu=False, workers=1, gpus=3)[3]
    assert gpu1.args == ["worker", "--gpu", "1"]
    cpu = up.child_specs(settings, cpu=True, workers=2, gpus=3)
    assert [c.args for c in cpu[2:]] == [["worker", "--cpu", "--slot", "0"], ["worker", "--cpu", "--slot", "1"]]
    assert cpu[3].worker_id and cpu[3].worker_id.endswith(":cpu1")
    assert [c.name for c in up.child_specs(settings, cpu=False, workers=1, gpus=0)][2:] == ["worker-cpu0"]


def test_stop_takes_down_the_whole_tree(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANDCHILD_FILE", str(tmp_path / "gc.pid"))
    farm = up.Farm(settings, [up.ChildSpec("a", [], SLEEPER), up.ChildSpec("b", [], SPAWNER)], grace=2.0,
                   echo=lambda m: None)
    farm.start()
    assert _wait(lambda: (tmp_path / "gc.pid").exists() and (tmp_path / "gc.pid").read_text())
    grandchild = int((tmp_path / "gc.pid").read_text())
    pids = farm.pids()
    assert set(pids) == {"a", "b"}
    # each child leads its own process group: a Ctrl-C in the terminal does not reach it
    assert all(os.getpgid(p) == p for p in pids.values())
    codes = farm.stop()
    assert codes["a"] == -signal.SIGTERM
    assert not any(_alive(p) for p in pids.values())
    assert _wait(lambda: not _alive(grandchild), 5), "a grandchild in its own session survived the stop"


def test_dead_child_is_restarted_with_a_message(settings: Settings) -> None:
    messages: list[str] = []
    farm = up.Farm(settings, [up.ChildSpec("sleepy", [], SLEEPER)], echo=messages.append, grace=2.0)
    farm.start()
    first = farm.pids()["sleepy"]
    os.kill(first, signal.SIGKILL)
    assert _wait(lambda: farm.child("sleepy").proc.poll() is not None)  # type: ignore[union-attr]
    assert farm.poll()
    assert farm.pids()["sleepy"] != first
    assert any("sleepy exited with code -9; restarting it (restart 1 of" in m for m in messages), messages
    farm.stop()


def test_a_child_that_keeps_dying_stops_the_farm(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up, "MAX_RESTARTS", 2)
    messages: list[str] = []
    farm = up.Farm(settings, [up.ChildSpec("crashy", [], [sys.executable, "-c", "raise SystemExit(3)"]),
                              up.ChildSpec("ok", [], SLEEPER)], echo=messages.append, grace=2.0)
    farm.start()
    ok = True
    end = time.monotonic() + 30
    while ok and time.monotonic() < end:
        ok = farm.poll()
        time.sleep(0.05)
    assert not ok and farm.failed and "crashy exited with code 3 3 times" in farm.failed
    assert sum("restarting it" in m for m in messages) == 2
    farm.stop()


def test_orphans_of_a_dead_child_are_killed(settings: Settings, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANDCHILD_FILE", str(tmp_path / "gc.pid"))
    farm = up.Farm(settings, [up.ChildSpec("w", [], SPAWNER)], echo=lambda m: None, grace=2.0)
    if not farm.subreaper:
        pytest.skip("no PR_SET_CHILD_SUBREAPER on this platform")
    farm.start()
    assert _wait(lambda: (tmp_path / "gc.pid").exists() and (tmp_path / "gc.pid").read_text())
    grandchild = int((tmp_path / "gc.pid").read_text())
    os.kill(farm.pids()["w"], signal.SIGKILL)  # the worker dies; its training run is orphaned
    assert _wait(lambda: farm.child("w").proc.poll() is not None)  # type: ignore[union-attr]
    farm.poll()
    assert _wait(lambda: not _alive(grandchild), 5), "the orphaned grandchild kept running"
    farm.stop()


# a child that double-forks (as bwrap does for a sandboxed run): the grandchild's parent exits at once,
# so the grandchild is re-parented to the subreaper and, once it exits, is that process's zombie; then the
# child sleeps until RELEASE_FILE appears and exits with code 7 (a restarted one only exits with 7)
DOUBLE_FORKER = [sys.executable, "-c",
                 "import os, sys, time\n"
                 "if not os.path.exists(os.environ['RELEASE_FILE']):\n"
                 "    if os.fork() == 0:\n"
                 "        if os.fork() == 0:\n"
                 "            time.sleep(0.2); os._exit(0)\n"
                 "        os._exit(0)\n"
                 "    os.wait()\n"
                 "while not os.path.exists(os.environ['RELEASE_FILE']): time.sleep(0.05)\n"
                 "sys.exit(7)\n"]


def _zombie_children() -> set[int]:
    """This process's children that have exited and nobody has waited for (/proc/<pid>/stat: state Z)."""
    out = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(ppid) == os.getpid():
            out.add(int(entry))
    return out


def test_poll_reaps_orphans_that_exited_but_not_its_own_children(settings: Settings, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # every sandboxed run's bwrap was re-parented to `farm up` and, once exited, stayed its zombie: only the
    # death of a managed child or the stop reaped them, so they piled up on a long-running farm
    monkeypatch.setenv("RELEASE_FILE", str(tmp_path / "release"))
    messages: list[str] = []
    farm = up.Farm(settings, [up.ChildSpec("w", [], DOUBLE_FORKER), up.ChildSpec("a", [], SLEEPER)],
                   echo=messages.append, grace=2.0)
    if not farm.subreaper or not os.path.isdir("/proc"):
        pytest.skip("no PR_SET_CHILD_SUBREAPER or /proc on this platform")
    before = _zombie_children()  # left by something else in this process: not ours to judge
    try:
        farm.start()
        managed = set(farm.pids().values())
        assert _wait(lambda: bool(_zombie_children() - managed - before)), "the orphan never became our zombie"
        for _ in range(3):
            assert farm.poll()
            time.sleep(0.05)
        assert not _zombie_children() - before, "an exited orphan is still a zombie child of the farm"
        assert farm.pids().keys() == {"w", "a"}

        # a managed child that has exited is a zombie too, but its status belongs to its Popen
        w = farm.child("w").proc
        assert w is not None
        (tmp_path / "release").touch()
        assert _wait(lambda: w.pid in _zombie_children())
        assert farm.poll()
        assert w.returncode == 7
        assert any("w exited with code 7; restarting it" in m for m in messages), messages
    finally:
        (tmp_path / "release").touch()
        codes = farm.stop()
    assert codes["a"] == -signal.SIGTERM
    assert not _zombie_children() - before


def test_gpu_ids_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert up.gpu_ids(2) == [2, 3]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert up.gpu_ids(3) == [0, 1, 2]



def test_gpu_ids_map_uuids_to_nvidia_smi_indices(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """CUDA_VISIBLE_DEVICES may name GPUs by UUID (full or a unique prefix, as CUDA accepts): the workers get
    those GPUs' nvidia-smi indices, and anything that is not one (a MIG instance) is an error, not a guess."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, GPU-aaaa-1111\\n1, GPU-bbbb-2222\\n2, GPU-cccc-3333\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc-3333,GPU-bbbb")
    assert up.gpu_ids(2) == [2, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    with pytest.raises(CLIError, match="MIG-1234"):
        up.gpu_ids(1)


def test_interrupted_runs_are_released_without_spending_a_retry(migrated: Settings) -> None:
    from farm.broker import reset_celery
    from farm.db import session_scope
    from farm.models import Experiment, ExperimentStatus, Worker
    from farm.recovery import live_experiment_ids
    from tests.factories import make_experiment, make_program

    reset_celery()
    with session_scope() as s:
        s.add_all([Worker(id="h:cpu0", host="h", hw_class="cpu"), Worker(id="other:cpu0", host="other", hw_class="cpu")])
        s.flush()
        p = make_program(s)
        mine = make_experiment(s, p, ExperimentStatus.running, worker_id="h:cpu0", retry_count=1, progress=40.0)
        theirs = make_experiment(s, p, ExperimentStatus.running, worker_id="other:cpu0")
        done = make_experiment(s, p, ExperimentStatus.succeeded, worker_id="h:cpu0")
        ids = (mine.id, theirs.id, done.id)
    try:
        assert up.release_interrupted({"h:cpu0"}, migrated) == [ids[0]]
    finally:
        reset_celery()
    with session_scope() as s:
        m, t, d = (s.get(Experiment, i) for i in ids)
        assert m is not None and t is not None and d is not None
        assert m.status == ExperimentStatus.queued and m.retry_count == 1 and m.worker_id is None
        assert m.attempts[-1]["reason"].startswith("farm up stopped its worker")
        assert t.status == ExperimentStatus.running and d.status == ExperimentStatus.succeeded
    assert ids[0] in (live_experiment_ids(migrated, {"cpu"}) or set())


def test_children_see_the_parents_settings_whatever_their_directory(
        farm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # settings read ".env" from the current directory, and the children start in the repository: a
    # FARM_API_PORT / FARM_DATABASE_URL in the caller's .env reached `farm up` but not its children
    # (the parent then waited for the API on a port nobody listened on)
    here = tmp_path / "caller"
    here.mkdir()
    (here / ".env").write_text("FARM_API_PORT=9911\nFARM_DATABASE_URL=sqlite:///rel/farm.db\n"
                               "FARM_PUBLIC_DASHBOARD=true\nFARM_LLM_API_KEY=sk-from-dotenv\n")
    monkeypatch.chdir(here)
    parent = Settings()
    assert parent.api_port == 9911 and parent.public_dashboard
    env = up.child_env(parent)
    assert env["FARM_DATABASE_URL"] == f"sqlite:///{here / 'rel' / 'farm.db'}"  # absolute: the child's cwd differs

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text("FARM_API_PORT=1234\nFARM_SCHEDULER_INTERVAL=9\n")  # e.g. one in the repository
    monkeypatch.chdir(elsewhere)
    for k in [k for k in os.environ if k.startswith("FARM_") and not k.startswith("FARM_TEST_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("FARM_"):
            monkeypatch.setenv(k, v)
    child = Settings()
    assert child.api_port == 9911 and child.public_dashboard and child.scheduler_interval == parent.scheduler_interval
    assert child.llm_api_key.get_secret_value() == "sk-from-dotenv"
    assert child.db_url == env["FARM_DATABASE_URL"] and child.home == parent.home
    assert child.model_dump(exclude={"database_url"}) == parent.model_dump(exclude={"database_url"})


def test_port_in_use_takes_ipv6_hosts() -> None:
    # `FARM_API_HOST=::1 farm up` crashed with socket.gaierror: the probe always opened an IPv4 socket
    import socket

    assert up.port_in_use("::1", 1) is False
    assert up.dashboard_url(Settings(api_host="::1", api_port=8765)) == "http://[::1]:8765/"
    try:
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        srv.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with srv:
        srv.listen(1)
        assert up.port_in_use("::1", srv.getsockname()[1]) is True
        assert up.port_in_use("::", srv.getsockname()[1]) is True


def test_farm_up_beside_a_running_scheduler_stops_at_once_and_starts_nothing(
        migrated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: docs/deploy.md says a `farm up` against a database another scheduler runs on stops at once;
    it migrated, started its API and workers, and its scheduler died on the lock five times before the farm gave up.
    Now it refuses before it touches anything."""
    from farm.db import SchedulerLock, SchedulerLockHeld, get_engine

    started: list[str] = []
    monkeypatch.setattr(up.Farm, "start", lambda self: started.append("children"))
    monkeypatch.setattr(up, "prepare", lambda *a, **k: started.append("prepare"))
    running = SchedulerLock(get_engine())
    running.acquire()
    try:
        with pytest.raises(SchedulerLockHeld, match="another scheduler is running"):
            up.run_up(cpu=True, workers=1, grace=1.0)
    finally:
        running.release()
    assert started == []
