"""Pure pieces of the worker: progress parsing, workdir refusals, sandbox command lines, the harness
checksum (same algorithm as the template's), message parsing for the broker reconciler."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.harness import harness_checksum, result_digest
from farm.recovery import _filesystem_live_ids, message_experiment_id
from worker.identity import hw_class_of
from worker.progress import Progress
from worker.sandbox import Mounts, bwrap_argv
from worker.tasks import parse_experiment_id
from worker.workdir import Refused, materialise

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "training_template"
FAKE = ROOT / "tests" / "fake_template"


def test_progress_from_the_template_and_reference_lines():
    p = Progress()
    p.feed("step    42 | loss 3.4568 | lrm 1.00 | progress 0.140 | 12,345 tok/s")
    assert (p.step, p.loss, p.percent) == (42, 3.4568, 14.0)
    p.feed("step 00043 (15.5%) | loss: 3.000000 | lrm: 1.00 | mfu: 1.2%")
    assert (p.step, p.loss, p.percent) == (43, 3.0, 15.5)
    p.feed("loss nan, progress banana")  # unreadable: nothing changes
    assert (p.loss, p.percent) == (3.0, 15.5)


def test_harness_checksum_matches_the_templates_own_function():
    tree = ast.parse((TEMPLATE / "prepare.py").read_text())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("harness_checksum",
                                                                                  "result_digest")]
    ns: dict[str, object] = {"Path": Path, "os": os, "hashlib": hashlib, "hmac": __import__("hmac"),
                             "json": __import__("json")}
    exec(compile(ast.Module(body=fns, type_ignores=[]), "prepare_fns", "exec"), ns)  # noqa: S102
    assert ns["harness_checksum"](TEMPLATE) == harness_checksum(TEMPLATE)  # type: ignore[operator]
    payload = {"val_bpb": 1.0, "nonce": "ab"}
    assert ns["result_digest"](payload, "ab") == result_digest(payload, "ab")  # type: ignore[operator]


def test_materialise_overlays_editable_files_and_refuses_harness_changes(tmp_path):
    wd = materialise(FAKE, tmp_path / "w1", {"train.py": "print('hi')\n"}, ["train.py"])
    assert (wd.path / "train.py").read_text() == "print('hi')\n"
    assert wd.harness_sha256 == harness_checksum(FAKE)
    assert wd.readonly_paths() == (wd.path / "kernels", wd.path / "prepare.py")
    same = (FAKE / "prepare.py").read_text()
    materialise(FAKE, tmp_path / "w2", {"prepare.py": same}, ["train.py"])  # unchanged copy: fine
    with pytest.raises(Refused, match="not editable"):
        materialise(FAKE, tmp_path / "w3", {"prepare.py": "x = 1\n"}, ["train.py"])
    with pytest.raises(Refused, match="plain relative path"):
        materialise(FAKE, tmp_path / "w4", {"../escape.py": "x"}, ["../escape.py"])
    with pytest.raises(Refused, match="template_digest"):
        materialise(FAKE, tmp_path / "w5", {}, ["train.py"], expected_digest="0" * 64)
    with pytest.raises(Refused, match="harness differs"):  # a program that lists a fixed file as editable
        materialise(FAKE, tmp_path / "w6", {"prepare.py": "x = 1\n"}, ["train.py", "prepare.py"])


def test_bwrap_hides_before_it_binds(tmp_path):
    home = tmp_path / "home"
    (home / "work" / "w").mkdir(parents=True)
    (home / "data").mkdir()
    argv = bwrap_argv(["python", "train.py"], Mounts(workdir=home / "work" / "w", readonly=(home / "data",),
                                                     hidden=(home,)))
    s = " ".join(argv)
    assert "--unshare-net" in argv and "--unshare-pid" in argv and "--cap-drop" in argv
    assert s.index(f"--tmpfs {home}") < s.index(f"--ro-bind {home / 'data'}") < s.index(f"--bind {home / 'work'}")
    assert argv[-3:] == ["--", "python", "train.py"]


def test_bwrap_binds_the_gpu_device_nodes_back(tmp_path):
    """Regression: bwrap's fresh /dev has no /dev/nvidia*, so every CUDA candidate ran without a GPU
    (`needs CUDA`, recorded as a crash). Stand-in nodes (plain files) go through the same code."""
    import shutil
    import subprocess

    dev = tmp_path / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-caps/nvidia-cap1", "kvm"):
        (dev / name).write_text(name)
    work = tmp_path / "w"
    work.mkdir()
    argv = bwrap_argv(["sh", "-c", "ls /dev /dev/nvidia-caps && cat /dev/nvidia0"], Mounts(workdir=work), dev=dev)
    assert f"--dev-bind {dev / 'nvidia0'} /dev/nvidia0" in " ".join(argv)
    assert "kvm" not in " ".join(argv)  # only GPU nodes come back
    if not shutil.which("bwrap"):
        pytest.skip("bwrap not installed: the argv is checked, the run is not")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    assert {"nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-caps", "nvidia-cap1", "null"} <= set(listed)
    assert "kvm" not in listed and r.stdout.rstrip().endswith("nvidia0")


def test_payload_and_message_parsing(tmp_path):
    assert parse_experiment_id(7) == 7 and parse_experiment_id("8") == 8
    assert parse_experiment_id(True) is None and parse_experiment_id({"id": 1}) is None
    assert parse_experiment_id(0) is None
    from farm.broker import publish_experiment
    from farm.settings import Settings

    s = Settings(home=tmp_path)
    from farm.broker import make_celery

    app = make_celery(s)
    publish_experiment(41, "cpu", app=app)
    publish_experiment(42, "cpu", time_limit=5, app=app)
    assert _filesystem_live_ids(s.broker_dir) == {41, 42}
    assert message_experiment_id(b"not json") is None


def test_hw_class_from_gpu_name():
    assert hw_class_of("NVIDIA H100 80GB HBM3") == "gpu.h100"
    assert hw_class_of("NVIDIA A100-SXM4-40GB") == "gpu.a100"
    assert hw_class_of("NVIDIA GeForce RTX 4090") == "gpu.4090"


def test_interpreter_under_a_hidden_path_stays_reachable(tmp_path, monkeypatch):
    """Regression: a checkout (and its .venv) under /tmp vanished under the sandbox's /tmp tmpfs,
    so every candidate died with `bwrap: execvp .../.venv/bin/python: No such file or directory`."""
    import subprocess
    import sys

    import worker.sandbox as sb

    work = tmp_path / "w"
    work.mkdir()
    # pretend the interpreter lives inside a hidden folder: the real prefix is hidden, then bound back
    prefix = Path(sys.prefix).resolve()
    argv = bwrap_argv([sys.executable, "-c", "import sys; print(sys.prefix)"],
                      Mounts(workdir=work, hidden=(prefix,)))
    assert f"--ro-bind {prefix} {prefix}" in " ".join(argv)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sb.runtime_paths()


def test_an_interpreter_inside_the_farm_home_does_not_keep_the_home_visible(tmp_path, monkeypatch):
    """Found by review: with the venv inside FARM_HOME, hidden_paths left the whole home out (only farm.db and broker/
    stayed hidden), so a candidate could read other workdirs, the logs and the raw corpus. The home is hidden, and the
    sandbox binds the interpreter's folder back read-only on top."""
    from types import SimpleNamespace

    import worker.runner as runner
    import worker.sandbox as sb
    from farm.settings import Settings

    home = tmp_path / "home"
    venv = home / "venv"
    (venv / "bin").mkdir(parents=True)
    (home / "logs").mkdir()
    monkeypatch.delenv("FARM_SANDBOX_HIDE", raising=False)
    ctx = SimpleNamespace(settings=Settings(home=home), python=str(venv / "bin" / "python"))
    hidden = runner.hidden_paths(ctx)  # type: ignore[arg-type]
    assert home in hidden, hidden
    monkeypatch.setattr(sb, "runtime_paths", lambda: (venv,))
    argv = " ".join(bwrap_argv(["python"], Mounts(workdir=tmp_path / "w", hidden=hidden)))
    assert argv.index(f"--tmpfs {home}") < argv.index(f"--ro-bind {venv} {venv}"), argv


@pytest.mark.parametrize("total", [(1 << 20) + 1, 4 << 20])  # cap inside a chunk; cap on a chunk boundary
def test_log_cap_reports_truncation_wherever_the_cap_falls(tmp_path, total):
    import sys

    from worker.supervise import supervise

    cap = 1 << 20
    # 64 KiB writes, like a flooding candidate: with total = 4 MiB the cap lands exactly between two reads
    code = (f"import os\nleft = {total}\nwhile left > 0:\n    n = min(left, 65536)\n"
            f"    os.write(1, b'x' * (n - 1) + b'\\n')\n    left -= n\n")
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out.log", wall_limit=30, memory_mb=0, log_cap=cap)
    assert run.exit_code == 0
    assert run.log_truncated and run.log_bytes == cap
    text = (tmp_path / "out.log").read_bytes()
    assert len(text) <= cap + 200 and text.rstrip().endswith(b"was discarded]")


def test_a_supervised_process_beats_as_soon_as_it_starts(tmp_path):
    """Found by review: the first beat of a supervised process came a whole interval after its start, so across the
    hand-off from the training process to the isolated evaluation the claim went up to 2 x interval + the hand-off
    without a beat, past the reaper's cut-off: a live run was re-queued and its evaluation killed. A claim lost
    before the first interval is over must now be seen at once (with the old first beat this run timed out)."""
    from worker.supervise import supervise

    ticks: list[float] = []
    run = supervise(["sleep", "60"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, log_path=tmp_path / "out.log",
                    wall_limit=20, memory_mb=0, log_cap=1 << 20, tick_every=3600,
                    on_tick=lambda progress: bool(ticks.append(time.monotonic())))
    assert run.killed == "claim_lost" and len(ticks) == 1


def test_a_heartbeat_that_blocks_does_not_stop_the_watchdogs(tmp_path):
    """Found by review: the heartbeat ran inline in the watch loop, so during a database outage (10 s a connection
    attempt) the memory and wall-clock checks ran once per blocked beat: a run grew to 1.9 GB under a 200 MB limit.
    The beat now runs in its own thread; a blocked one is skipped, not queued, and a lost claim is still seen."""
    from worker.supervise import supervise

    calls: list[float] = []

    def blocked(progress):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        time.sleep(5)
        return True

    code = "import time\nx = []\nwhile True:\n    x.append(bytearray(50 << 20))\n    time.sleep(0.2)\n"
    t0 = time.monotonic()
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out.log", wall_limit=30, memory_mb=200, log_cap=1 << 20, tick_every=0.5,
                    on_tick=blocked)
    assert run.killed == "memory" and time.monotonic() - t0 < 4 and run.peak_rss_mb < 400, run
    assert len(calls) == 1  # the ticks due while it blocked were skipped
    run = supervise(["sleep", "60"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, log_path=tmp_path / "out2.log",
                    wall_limit=1.5, memory_mb=0, log_cap=1 << 20, tick_every=0.5, on_tick=blocked)
    assert run.killed == "timeout" and run.wall_seconds < 4, run.wall_seconds


def test_pages_shared_after_a_fork_count_once_against_the_memory_limit(tmp_path):
    """Found by review: the watchdog summed each process's RSS, so the pages a run shares copy-on-write with the
    processes it forked (data-loader workers) counted once per process: 120 MB and two idle forks read about 390 MB
    and the run was killed as out of memory under 300 MB. Past the limit, the proportional set size decides."""
    from worker.supervise import supervise

    code = ("import os, time\nbuf = bytearray(120 << 20)\nfor i in range(0, len(buf), 4096):\n    buf[i] = 1\n"
            "kids = []\nfor _ in range(2):\n    pid = os.fork()\n    if pid == 0:\n        time.sleep(2)\n"
            "        os._exit(0)\n    kids.append(pid)\nfor k in kids:\n    os.waitpid(k, 0)\nprint('done')\n")
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out.log", wall_limit=30, memory_mb=300, log_cap=1 << 20)
    assert run.killed is None and run.exit_code == 0 and run.tail[-1] == "done", run
    assert 120 <= run.peak_rss_mb < 300, run.peak_rss_mb
    # memory a run really holds in each process still counts in full
    code = code.replace("time.sleep(2)", "own = bytearray(120 << 20)\n        own[::4096] = b'x' * len(own[::4096])\n"
                                          "        time.sleep(2)")
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out2.log", wall_limit=30, memory_mb=300, log_cap=1 << 20)
    assert run.killed == "memory", run


def test_a_run_that_fills_its_disk_is_stopped_before_the_disk_is_full(tmp_path, monkeypatch):
    """Found by review: a file-size cap limits one file, not how many. A run that wrote files until the disk was full
    left SQLite (in the farm home) unable to take its result, which was retried for an hour and lost, and the run
    repeated. The free space of the disks a run writes to is watched: it may use them down to the reserve, or half
    of what was free at its start; past that it is stopped, a crash with its reason. (A fake statvfs: this disk
    shrinks by what the run writes, from 300 MiB free.)"""
    import worker.supervise as sv
    from worker.outcome import RunFacts, judge

    work = tmp_path / "w"
    work.mkdir()
    real = os.statvfs

    def statvfs(path):  # type: ignore[no-untyped-def]
        used = sum(f.stat().st_size for f in work.iterdir()) if work.is_dir() else 0
        st = real(path)
        return os.statvfs_result((st.f_bsize, 1 << 20, st.f_blocks, st.f_bfree, 300 - used // 2**20, *st[5:]))

    monkeypatch.setattr(sv.os, "statvfs", statvfs)
    code = "import time\nfor i in range(1000):\n    open(f'f{i}', 'wb').write(bytes(10 << 20))\n    time.sleep(0.05)\n"
    guard = sv.DiskGuard([work, work], reserve_mb=2048)
    assert list(guard.floors.values()) == [(work, 150.0)]  # half of what was free: less than the reserve
    run = sv.supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=work,
                       log_path=tmp_path / "out.log", wall_limit=60, memory_mb=0, log_cap=1 << 20, disk=guard)
    written = sum(f.stat().st_size for f in work.iterdir()) // 2**20
    assert run.killed == "disk" and 150 <= written <= 200, (run, written)
    assert run.disk_full and "MiB free" in run.disk_full and "FARM_DISK_RESERVE_MB" in run.disk_full
    outcome = judge(RunFacts(exit_code=None, killed="disk", disk_full=run.disk_full))
    assert outcome.status.value == "crashed" and (outcome.reason or "").startswith("out of disk space: the disk")


def test_a_process_that_left_the_tree_holding_the_output_is_killed_without_a_long_wait(tmp_path):
    """Found by review: without bwrap's PID namespace (the unshare and none fallbacks), a process that double-forked
    and called setsid escaped the tree kill and still held the output pipe, so the reader's join waited its full
    10 s after every such run with no heartbeat, and the reaper took the claim of a finished run. Now whatever still
    holds the run's output after it ends is killed, within a few seconds."""
    import signal as sig

    from worker.supervise import supervise

    marker = f"escaped-{os.getpid()}-{time.monotonic_ns()}"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
            "    os._exit(0)\n"
            "time.sleep(0.5)\nprint('done', flush=True)\n")
    t0 = time.monotonic()
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out.log", wall_limit=30, memory_mb=0, log_cap=1 << 20)
    took = time.monotonic() - t0
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
    for p in left:
        os.kill(int(p), sig.SIGKILL)
    assert run.exit_code == 0 and run.tail == ["done"] and took < 6, (run, took)
    assert left == [], "a process the run left behind is still alive"


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def test_a_log_that_cannot_be_written_does_not_stop_the_output_being_read(tmp_path):
    """Found by review: disk full. The log write raised, the output-reader thread died (its cleanup raised again,
    so the pipe's fd was never closed either), nobody read the pipe, the child blocked once it filled and a healthy
    run was recorded timed_out. Now the reader stops logging and keeps draining, with the tail for the summary."""
    from worker.outcome import parse_summary
    from worker.supervise import supervise

    code = "for i in range(20000):\n    print('step', i, 'loss 1.0')\nprint('---')\nprint('val_bpb: 1.0')\n"
    fds_before = len(os.listdir("/proc/self/fd"))
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=Path("/dev/full"), wall_limit=15, memory_mb=0, log_cap=32 << 20)
    assert run.killed is None and run.exit_code == 0 and run.wall_seconds < 10
    assert parse_summary(run.tail) == {"val_bpb": "1.0"} and run.log_error and "space" in run.log_error
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the pipe's read end was closed too


def test_a_result_write_waits_out_a_long_database_outage(tmp_path, monkeypatch):
    """Found by review: the write of a finished run's result gave up after ~15 s of outage, so the result was
    dropped and the whole run repeated. It now retries (every half heartbeat interval) up to record_patience."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    import worker.runner as runner
    from farm.models import ExperimentStatus
    from farm.settings import Settings
    from worker.outcome import Outcome

    clock = [0.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    up_at = 600.0  # ten minutes down

    @contextmanager
    def scope():  # type: ignore[no-untyped-def]
        if clock[0] < up_at:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        yield None

    written: list[int] = []
    monkeypatch.setattr(runner, "session_scope", scope)
    monkeypatch.setattr(runner.states, "record_result", lambda s, exp_id, *a, **k: written.append(exp_id) or True)
    ctx = SimpleNamespace(settings=Settings(home=tmp_path, heartbeat_interval=5.0),
                          identity=SimpleNamespace(gpu_name=None), worker_id="w1", slug="w1")
    job = SimpleNamespace(id=7, hw_class="cpu", retry=0)
    ex = runner.Execution(Outcome(ExperimentStatus.succeeded, None, {"val_bpb": 1.0}))
    assert runner._record(ctx, job, ex) and written == [7]  # type: ignore[arg-type]
    assert up_at <= clock[0] <= up_at + 2.5  # retried every 2.5 s (half the interval): it lands at once
    clock[0] = 0.0
    up_at = 10_000.0  # past the patience (1 h): the error reaches the caller
    with pytest.raises(OperationalError):
        runner._record(ctx, job, ex)  # type: ignore[arg-type]


def test_a_result_the_database_refuses_is_recorded_without_its_figures(tmp_path, monkeypatch):
    """Found by review: a database error other than OperationalError while writing the result (a NUL in the log
    tail, a NaN in the timings: psycopg / Postgres DataError) was caught by nothing; the task failed, the run stayed
    `running` until reaped and repeated until `lost`. Now the run is recorded without its figures, with why."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from sqlalchemy.exc import DataError

    import worker.runner as runner
    from farm.models import ExperimentStatus
    from farm.settings import Settings
    from worker.outcome import Outcome

    @contextmanager
    def scope():  # type: ignore[no-untyped-def]
        yield None

    calls: list[tuple[ExperimentStatus, dict[str, object]]] = []

    def record(session, exp_id, worker_id, status, **fields):  # type: ignore[no-untyped-def]
        calls.append((status, fields))
        if len(calls) == 1 or refuse_all:
            raise DataError("INSERT INTO results", {}, Exception("invalid input syntax for type json\nDETAIL: NaN"))
        return True

    monkeypatch.setattr(runner, "session_scope", scope)
    monkeypatch.setattr(runner.states, "record_result", record)
    ctx = SimpleNamespace(settings=Settings(home=tmp_path, heartbeat_interval=5.0),
                          identity=SimpleNamespace(gpu_name=None), worker_id="w1", slug="w1")
    job = SimpleNamespace(id=7, hw_class="cpu", retry=0)
    ex = runner.Execution(Outcome(ExperimentStatus.succeeded, None, {"val_bpb": 1.0}),
                          timings={"child_seconds": 3.0, "training_seconds": float("nan"), "sandbox": "bwrap"})
    refuse_all = False
    assert runner._record(ctx, job, ex)  # type: ignore[arg-type]
    status, fields = calls[-1]
    assert len(calls) == 2 and status == ExperimentStatus.refused and "val_bpb" not in fields
    assert fields["timings"] == {"child_seconds": 3.0} and fields["log_tail"] == ""
    assert "database refused the result" in str(fields["reason"]) and "invalid input syntax" in str(fields["reason"])
    ex = runner.Execution(Outcome(ExperimentStatus.crashed, "exit code 1"))
    calls.clear()
    assert runner._record(ctx, job, ex) and calls[-1][0] == ExperimentStatus.crashed  # type: ignore[arg-type]
    refuse_all = True  # refused again: that reaches the caller (no loop)
    calls.clear()
    with pytest.raises(DataError):
        runner._record(ctx, job, ex)  # type: ignore[arg-type]
    assert len(calls) == 2
    # any other database error is not the run's doing: it is not recorded without its figures (found by review)
    from sqlalchemy.exc import InternalError

    def read_only(session, exp_id, worker_id, status, **fields):  # type: ignore[no-untyped-def]
        calls.append((status, fields))
        raise InternalError("INSERT INTO results", {}, Exception("cannot execute INSERT in a read-only transaction"))

    monkeypatch.setattr(runner.states, "record_result", read_only)
    calls.clear()
    with pytest.raises(InternalError):
        runner._record(ctx, job, runner.Execution(Outcome(ExperimentStatus.succeeded, None, {"val_bpb": 1.0})))
    assert len(calls) == 1


def test_a_nul_in_the_runs_output_is_dropped_from_what_is_recorded(farm_env):
    """Found by review: a NUL byte in the last lines of output went into log_tail and the crash reason, and
    Postgres text cannot hold one (psycopg DataError): the result was lost. record_result strips NULs from every
    string it writes (tests/integration/test_states.py writes one to Postgres)."""
    from farm import migrate, states
    from farm.db import session_scope
    from farm.models import Experiment, ExperimentStatus, Result
    from farm.settings import get_settings
    from tests.factories import make_experiment, make_program, make_worker

    migrate.upgrade(get_settings().db_url)
    with session_scope() as s:
        make_worker(s, "w1")
        exp_id = make_experiment(s, make_program(s)).id
        assert states.claim(s, exp_id, "w1")
    with session_scope() as s:
        assert states.record_result(s, exp_id, "w1", ExperimentStatus.crashed, reason="ValueError: bad \x00 byte",
                                    log_tail="step 1\nValueError: bad \x00 byte", timings={"note": ["a\x00b"]})
    with session_scope() as s:
        exp = s.get(Experiment, exp_id)
        res = s.query(Result).filter_by(experiment_id=exp_id).one()
        assert exp is not None and exp.status_reason == "ValueError: bad  byte"
        assert res.reason == "ValueError: bad  byte" and res.log_tail == "step 1\nValueError: bad  byte"
        assert res.timings == {"note": ["ab"]}


def test_isolated_evaluation_follows_the_setting_and_the_templates_declaration(tmp_path, monkeypatch):
    """FARM_EVAL_ISOLATION=auto asks the real template's harness to export (FARM_EVAL_EXPORT) and expects a second
    process to score it; `off`, or a template whose prepare.py does not declare ISOLATED_EVALUATION, evaluates
    in-process as before."""
    from types import SimpleNamespace

    import worker.runner as runner
    from farm.settings import Settings

    job = SimpleNamespace(profile="cpu", budget=2.0, seed=1, template="default")
    work = tmp_path / "w"
    for setting, template, isolated in (("auto", None, True), ("off", None, False), ("auto", FAKE, False)):
        if template is None:
            monkeypatch.delenv("FARM_TEMPLATE_DIR", raising=False)
        else:
            monkeypatch.setenv("FARM_TEMPLATE_DIR", str(template))
        ctx = SimpleNamespace(settings=Settings(home=tmp_path, eval_isolation=setting), python=sys.executable, corpus_id=None,
                              compile_cache=tmp_path / "cc", template_cache=tmp_path / "tc")
        env = runner.child_env(ctx, job, work, nonce_fd=3)  # type: ignore[arg-type]
        assert ("FARM_EVAL_EXPORT" in env) == isolated, (setting, template)
        assert runner.expected_settings(ctx, job, work)["isolated"] == isolated  # type: ignore[arg-type]
        if isolated:
            assert env["FARM_EVAL_EXPORT"] == str(work / runner.EXPORT_NAME)


def test_hold_stops_the_whole_tree_until_released_and_counts_the_time(tmp_path):
    """Two slots: a run started early that is still running past the early-start limit before its turn is stopped
    (SIGSTOP) with everything it forked, and continued at its turn. A forked child's clock shows the gap too."""
    import time

    from worker.supervise import supervise

    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    out = 'child'\n"
            "else:\n"
            "    out = 'parent'\n"
            "last, gap, t0 = time.monotonic(), 0.0, time.monotonic()\n"
            "while time.monotonic() - t0 < 2.5:\n"
            "    time.sleep(0.02)\n"
            "    now = time.monotonic()\n"
            "    gap, last = max(gap, now - last), now\n"
            "print(out, 'GAP', round(gap, 2), flush=True)\n"
            "if out == 'parent':\n"
            "    os.wait()\n")
    t0 = time.monotonic()
    run = supervise([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                    log_path=tmp_path / "out.log", wall_limit=30, memory_mb=0, log_cap=1 << 20,
                    hold=lambda: 0.5 < time.monotonic() - t0 < 1.7)
    assert run.exit_code == 0, run.tail
    assert 1.0 <= run.held_seconds <= 1.6, run.held_seconds
    gaps = {line.split()[0]: float(line.split()[-1]) for line in run.tail if "GAP" in line}
    assert set(gaps) == {"parent", "child"}, run.tail
    assert all(g >= 0.9 for g in gaps.values()), gaps  # both were stopped, not only the one Popen started


def test_a_folder_corpus_is_pinned_at_start_and_a_template_that_cannot_name_it_stops_the_worker(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import worker.lifecycle as lifecycle
    import worker.runner as runner
    from farm.settings import Settings

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(300):
        (folder / f"n{i}.txt").write_text(f"note {i}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FARM_CORPUS", "corpus")  # relative to the worker's folder, not to the child's
    monkeypatch.delenv("FARM_TEMPLATE_DIR", raising=False)
    ctx = SimpleNamespace(settings=Settings(home=tmp_path / "home"), python=sys.executable, corpus_id=None,
                          compile_cache=tmp_path / "cc", template_cache=tmp_path / "tc",
                          identity=SimpleNamespace(gpu_index=None), worker_id="w", slug="w")
    lifecycle.pin_corpus(ctx)  # type: ignore[arg-type]
    assert ctx.corpus_id and ctx.corpus_id.startswith("dir-")
    env = runner.child_env_base(ctx, profile="cpu", workdir=tmp_path / "w")  # type: ignore[arg-type]
    assert env["FARM_CORPUS"] == str(folder) and env["FARM_CORPUS_ID"] == ctx.corpus_id
    # a template whose prepare.py does not know --corpus-id (it prints something else): a clear error at start
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(FAKE))
    ctx.corpus_id = None
    with pytest.raises(lifecycle.StartupError, match="--corpus-id for FARM_CORPUS=.*corpus failed"):
        lifecycle.pin_corpus(ctx)  # type: ignore[arg-type]
    monkeypatch.setenv("FARM_CORPUS", "bible")  # a named corpus needs no pin
    lifecycle.pin_corpus(ctx)  # type: ignore[arg-type]
    assert ctx.corpus_id is None


def test_a_stop_waits_for_the_tree_to_release_its_compile_cache_lock_but_not_for_ever(tmp_path):
    """Found by review: a run stopped while it held one of inductor's per-kernel locks in the shared compile cache
    kept the run holding the device waiting for that lock until it was continued, i.e. until that run ended. The
    stop now waits for the lock to go, up to hold_defer_max (a candidate could hold one for ever)."""
    import time

    from worker.supervise import supervise

    cache = tmp_path / "cache"
    (cache / "inductor" / "locks").mkdir(parents=True)
    lock = cache / "inductor" / "locks" / "kernel.lock"
    code = ("import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'w')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "t0 = time.monotonic()\n"
            "while time.monotonic() - t0 < float(sys.argv[2]):\n"
            "    time.sleep(0.02)\n"
            "fcntl.flock(f, fcntl.LOCK_UN)\n"
            "t1 = time.monotonic()\n"
            "while time.monotonic() - t1 < 1.0:\n"
            "    time.sleep(0.02)\n")

    def held(lock_seconds: float, defer_max: float) -> float:
        t0 = time.monotonic()
        run = supervise([sys.executable, "-c", code, str(lock), str(lock_seconds)], env={"PATH": "/usr/bin:/bin"},
                        cwd=tmp_path, log_path=tmp_path / "out.log", wall_limit=30, memory_mb=0, log_cap=1 << 20,
                        hold=lambda: 0.3 < time.monotonic() - t0 < 3.0, hold_defer_under=cache,
                        hold_defer_max=defer_max)
        assert run.exit_code == 0, run.tail
        return run.held_seconds

    # lock released about 1.6 s in (python start-up + 1.5 s): stopped from then to 3.0 s, not from 0.3 s
    assert 0.6 <= held(1.5, 60.0) <= 1.8
    # a lock kept past the deferral's end: stopped anyway, 0.5 s after the stop was first wanted
    assert 1.8 <= held(5.0, 0.5) <= 2.4


def test_a_run_started_again_after_a_hand_back_keeps_the_first_starts_log(tmp_path):
    """A run handed back at a shutdown keeps its retry count: its second start wrote over the first one's log."""
    from worker.runner import run_log_path

    first = run_log_path(tmp_path, 20, 0)
    assert first.name == "experiment-20-r0.log"
    first.write_text("first start\n")
    second = run_log_path(tmp_path, 20, 0)
    assert second.name == "experiment-20-r0-2.log"
    second.write_text("second start\n")
    assert run_log_path(tmp_path, 20, 0).name == "experiment-20-r0-3.log"
    assert run_log_path(tmp_path, 20, 1).name == "experiment-20-r1.log"
    assert first.read_text() == "first start\n"


def test_the_climbmix_settings_reach_prepare_and_runs_and_a_mirrors_url_reaches_prepare_only(tmp_path, monkeypatch):
    """Found by review: the worker handed neither FARM_CLIMBMIX_SHARDS nor FARM_CLIMBMIX_URL to its start-up
    prepare.py, so a worker behind a mirror downloaded from the default host, and a shard count set on it was
    ignored. Runs see the shard count (the cache's name counts shards), never the URL (it may hold a token)."""
    from types import SimpleNamespace

    import worker.lifecycle as lifecycle
    import worker.runner as runner
    from farm.settings import Settings

    template = tmp_path / "tpl"
    template.mkdir()
    (template / "prepare.py").write_text(
        "import os\nprint(os.environ.get('FARM_CLIMBMIX_SHARDS'), os.environ.get('FARM_CLIMBMIX_URL'))\n")
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(template))
    monkeypatch.setenv("FARM_CLIMBMIX_SHARDS", "3")
    monkeypatch.setenv("FARM_CLIMBMIX_URL", "https://user:token@mirror.example/climbmix")
    ctx = SimpleNamespace(settings=Settings(home=tmp_path / "home"), python=sys.executable, corpus_id=None,
                          compile_cache=tmp_path / "cc", template_cache=tmp_path / "tc",
                          identity=SimpleNamespace(gpu_index=None))
    proc = lifecycle._prepare_py(ctx, [], "cpu", 60, subprocess.PIPE)  # type: ignore[arg-type]
    assert proc.stdout.decode().split() == ["3", "https://user:token@mirror.example/climbmix"]
    env = runner.child_env_base(ctx, profile="cpu", workdir=tmp_path / "w")  # type: ignore[arg-type]
    assert env["FARM_CLIMBMIX_SHARDS"] == "3" and "FARM_CLIMBMIX_URL" not in env



def test_a_worker_that_is_not_root_caps_the_processes_of_its_runs(tmp_path, monkeypatch):
    """Found by review: nothing limited how many processes a run starts, so a fork bomb could take every pid of the
    host before the watchdogs acted. prlimit sets RLIMIT_NPROC where the kernel applies it (not for root)."""
    import shutil
    import subprocess

    import worker.supervise as sv

    if not shutil.which("prlimit"):
        pytest.skip("no prlimit on this machine")
    monkeypatch.setattr(sv.os, "geteuid", lambda: 1000)
    argv = sv.rlimit_prefix(0, address_space=False, file_size_mb=64)
    assert f"--nproc={sv.NPROC_LIMIT}" in argv
    probe = "import resource; print(resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    out = subprocess.run([*argv, sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sv.NPROC_LIMIT)
    monkeypatch.setattr(sv.os, "geteuid", lambda: 0)
    assert not any(a.startswith("--nproc") for a in sv.rlimit_prefix(0, address_space=False, file_size_mb=64))


def test_the_sandboxs_own_folders_are_not_unbounded_memory(tmp_path, monkeypatch):
    """Found by review: the empty tmpfs over each hidden folder (the farm home) was writable and unsized, and so was
    /tmp: memory a run could fill without the resident-memory watchdog seeing it. Hidden folders are now read-only
    (a workdir bound inside one stays writable) and /tmp has a size where bwrap can set one."""
    import shutil
    import subprocess

    import worker.sandbox as sb

    if not shutil.which("bwrap") or not sb.probe("bwrap").ok:
        pytest.skip("bubblewrap cannot run here")
    monkeypatch.setattr(sb, "TMP_SIZE_MB", 1)
    home = tmp_path / "home"
    work = home / "work" / "w"
    work.mkdir(parents=True)
    script = ("echo ok > here && cat here; "
              "touch ../elsewhere 2>/dev/null && echo HIDDEN-WRITABLE; "
              "dd if=/dev/zero of=/tmp/big bs=1M count=4 2>/dev/null; ls -s /tmp/big")
    argv = sb.bwrap_argv(["sh", "-c", script], sb.Mounts(workdir=work, hidden=(home,)))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines()[0] == "ok" and "HIDDEN-WRITABLE" not in out, out
    if sb.bwrap_takes_size():
        assert int(out.split()[-2]) <= 1024, out  # KiB: at most the 1 MiB /tmp
