"""Run one child process under the worker's limits and watch it until it ends.

The child gets its own session (process group); output is streamed to a log file capped in size
(a candidate that floods stdout must not fill the disk) while the last lines stay in memory for
the summary and the crash reason. The supervisor kills the whole tree at the wall-clock limit,
when the tree's resident memory passes the limit, or when `on_tick` says the claim was lost.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from worker.progress import Progress

log = logging.getLogger(__name__)

TAIL_KEEP = 400  # lines kept in memory (the summary and the traceback live at the end)
LINE_MAX = 4000  # characters kept of one line
POLL = 0.1
HOLD_DEFER_MAX = 60.0  # seconds a stop waits for the tree to release its compile-cache locks (supervise)
MEMORY_POLL = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ChildRun:
    exit_code: int | None = None
    killed: str | None = None  # "timeout" | "memory" | "disk" | "claim_lost" | "shutdown"
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    log_bytes: int = 0
    log_truncated: bool = False
    tail: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    held_seconds: float = 0.0  # time the process tree spent stopped by `hold` (supervise)
    log_error: str | None = None  # the log file could not be written (disk full): the output was still read
    disk_full: str | None = None  # why it was stopped for disk space (killed == "disk")


class _Reader(threading.Thread):
    """Drains the child's output: log file up to `cap` bytes, the tail in memory, progress parsing.

    The log is best effort: when it cannot be written (disk full) the reader stops logging but goes on draining the
    pipe and keeping the tail. A reader that died with it left the pipe unread, the child blocked once it filled,
    and a healthy run was recorded timed_out (found by review)."""

    def __init__(self, fd: int, log_path: Path, cap: int, progress: Progress, append: bool = False) -> None:
        super().__init__(daemon=True, name="child-output")
        self.fd, self.cap, self.progress = fd, cap, progress
        self.log_error: str | None = None  # why the log stopped being written (the output was still read)
        self.log: BinaryIO | None = None
        try:
            self.log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in run()
        except OSError as exc:
            self.log_error = str(exc)
        self.written = 0
        self.truncated = False
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_KEEP)
        self.lock = threading.Lock()
        self._partial = b""

    def _write(self, data: bytes, flush: bool = False) -> None:
        if self.log is None:
            return
        try:
            self.log.write(data)
            if flush:
                self.log.flush()
        except OSError as exc:
            self.log_error = str(exc)
            self._close_log()

    def _close_log(self) -> None:
        log, self.log = self.log, None
        if log is None:
            return
        try:
            log.close()  # flushes what is buffered: it can fail as a write does
        except OSError as exc:
            self.log_error = self.log_error or str(exc)

    def _line(self, raw: bytes) -> None:
        text = raw[:LINE_MAX].decode("utf-8", errors="replace").rstrip()
        if not text:
            return
        with self.lock:
            self.tail.append(text)
        if len(raw) < 512:
            self.progress.feed(text)

    def run(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self.fd, 1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                room = max(0, self.cap - self.written)
                if room:
                    self._write(chunk[:room])
                    self.written += min(room, len(chunk))
                # past the cap, whether the cap fell inside this chunk or exactly on a chunk boundary
                if len(chunk) > room and not self.truncated:
                    self.truncated = True
                    self._write(f"\n[farm: log truncated at {self.cap} bytes; the rest of the output "
                                f"was discarded]\n".encode(), flush=True)
                data = self._partial + chunk
                parts = data.replace(b"\r", b"\n").split(b"\n")
                self._partial = parts.pop()
                if len(self._partial) > LINE_MAX * 4:  # a line with no end: keep its start only
                    self._line(self._partial)
                    self._partial = b""
                for raw in parts:
                    self._line(raw)
            if self._partial:
                self._line(self._partial)
        finally:
            try:
                self._close_log()
            finally:
                os.close(self.fd)

    def lines(self) -> list[str]:
        with self.lock:
            return list(self.tail)


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _pss_bytes(pid: int) -> int:
    """Proportional set size (/proc/PID/smaps_rollup), else the RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"Pss:")) * 1024
    except (OSError, ValueError, IndexError, StopIteration):
        return _rss_bytes(pid)


def tree_rss_mb(root: int) -> float:
    return sum(_rss_bytes(pid) for pid in tree_pids(root)) / 2**20


def tree_pss_mb(root: int) -> float:
    """The tree's proportional set size: a page shared by n processes counts 1/n in each, so pages forked
    copy-on-write (data-loader workers) count once. Slower than tree_rss_mb (the kernel walks the page tables), so
    read only to confirm an RSS past the limit."""
    return sum(_pss_bytes(pid) for pid in tree_pids(root)) / 2**20


def tree_memory_mb(root: int, limit_mb: float) -> float:
    """The tree's memory against a limit: its RSS, or where that is past the limit its PSS. RSS counts a page shared
    after a fork once in every process, so a 120 MB run with two idle forked workers read 393 MB and was killed as out
    of memory under a 300 MB limit (found by review)."""
    rss = tree_rss_mb(root)
    return rss if rss <= limit_mb else min(rss, tree_pss_mb(root))


class DiskGuard:
    """The free space of the file systems a run writes to (its work folder, the compile cache). A run may use them
    down to `reserve_mb` free, or to half of what was free when it started if that was less; past it, it is
    stopped. A file-size cap limits one file, not how many: a run that filled the disk left the database (SQLite in
    the farm home, or Postgres on the same disk) unable to take its result, and it ran again and again until `lost`
    (found by review)."""

    def __init__(self, paths: Sequence[Path], reserve_mb: float) -> None:
        self.floors: dict[int, tuple[Path, float]] = {}
        for p in paths:
            try:
                st, dev = os.statvfs(p), os.stat(p).st_dev
            except OSError:
                continue
            free = st.f_bavail * st.f_frsize / 2**20
            self.floors.setdefault(dev, (p, min(reserve_mb, free / 2)))

    def breached(self) -> str | None:
        """What is too full, or None."""
        for path, floor in self.floors.values():
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            free = st.f_bavail * st.f_frsize / 2**20
            if free < floor:
                return f"the disk holding {path} was down to {free:.0f} MiB free (the run may use it down to " \
                       f"{floor:.0f} MiB, FARM_DISK_RESERVE_MB)"
        return None


def locks_held_under(pids: Sequence[int], root: Path) -> bool:
    """Does one of `pids` hold a file lock (flock / POSIX, from /proc/locks) on a `*.lock` file under `root`?
    Inductor takes a per-kernel lock in its cache folder while it builds that kernel."""
    wanted, inodes = set(pids), set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or "->" in parts:  # "->": a process waiting for a lock, not holding it
                    continue
                try:
                    if int(parts[4]) in wanted:
                        inodes.add(int(parts[5].rsplit(":", 1)[1]))
                except ValueError:
                    continue
    except OSError:
        return False
    if not inodes:
        return False
    try:
        return any(path.stat().st_ino in inodes for path in root.rglob("*.lock"))
    except OSError:
        return False


def signal_tree(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send sig to the child's process group and every descendant found under it."""
    pids = tree_pids(proc.pid)
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_pipe_holders(inode: int) -> list[int]:
    """SIGKILL every other process that holds the pipe with this inode open: whatever the run started that left its
    process tree (a double fork and setsid, where the sandbox has no PID namespace of its own) and still holds its
    output. Returns their pids."""
    me, want, killed = os.getpid(), f"pipe:[{inode}]", []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            held = any(os.readlink(f"/proc/{entry.name}/fd/{fd}") == want for fd in os.listdir(f"/proc/{entry.name}/fd"))
        except OSError:
            continue
        if held:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group and every descendant still found under it."""
    signal_tree(proc, signal.SIGKILL)


# RLIMIT_NPROC for a worker that is not root (the image's user): processes and threads of that user, all its runs
# together. A fork bomb in a candidate otherwise took every pid of the host before the watchdogs could act (the
# kernel ignores the limit for root). Torch's threads and Inductor's compile workers stay far below it.
NPROC_LIMIT = 16384


def rlimit_prefix(memory_mb: float, *, address_space: bool, file_size_mb: float) -> list[str]:
    """prlimit(1) in front of the command: a file-size cap always, an address-space cap on CPU
    (CUDA maps huge virtual ranges, so GPU runs rely on the resident-memory watchdog alone), a process cap when the
    worker is not root."""
    if not shutil.which("prlimit"):
        return []
    cmd = ["prlimit", f"--fsize={int(file_size_mb * 2**20)}"]
    if os.geteuid() != 0:
        cmd.append(f"--nproc={NPROC_LIMIT}")
    if address_space and memory_mb > 0:
        # headroom: torch reserves far more address space than it touches; the RSS watchdog is
        # the real limit, this one only stops an allocation burst between two samples
        cmd.append(f"--as={int((memory_mb * 2 + 4096) * 2**20)}")
    return [*cmd, "--"]


class _Ticker:
    """`on_tick` in a thread of its own, one call at a time (a tick due while the last is still running is skipped).
    Called inline, a heartbeat that blocked (a database that does not answer: 10 s a connection attempt) stopped the
    watchdogs for as long, once a tick: a run grew to 1.9 GB under a 200 MB limit and overran its wall clock during
    an outage (found by review). `lost`: a call said the claim is lost; an exception is logged, not a lost claim."""

    def __init__(self, on_tick: Callable[[Progress], bool]) -> None:
        self._on_tick = on_tick
        self._wake = threading.Event()
        self._busy = False
        self._closed = False
        self._progress: Progress | None = None
        self.lost = False
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def request(self, progress: Progress) -> None:
        if not self._busy:
            self._busy, self._progress = True, progress
            self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                assert self._progress is not None
                if not self._on_tick(self._progress):
                    self.lost = True
            except Exception:  # noqa: BLE001 - a beat that failed is not a lost claim; the next one may land
                log.exception("heartbeat failed")
            finally:
                self._busy = False

    def close(self, wait: float = 2.0) -> None:
        """No more ticks; wait a moment for one under way (a beat left running is harmless: a beat of a run that
        ended changes nothing)."""
        self._closed = True
        self._wake.set()
        self._thread.join(wait)


def supervise(argv: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path, wall_limit: float,
              memory_mb: float, log_cap: int, pass_fds: Sequence[int] = (),
              on_tick: Callable[[Progress], bool] | None = None, tick_every: float = 5.0,
              extra_time: Callable[[], float] | None = None, append_log: bool = False,
              hold: Callable[[], bool] | None = None, hold_defer_under: Path | None = None,
              hold_defer_max: float = HOLD_DEFER_MAX, stop: Callable[[], bool] | None = None,
              disk: DiskGuard | None = None) -> ChildRun:
    """Start argv and watch it to the end. `on_tick(progress)` runs every `tick_every` seconds
    (heartbeat); returning False kills the child (the claim was lost). `extra_time()` extends the wall
    limit by time the child spent waiting for its turn on the device (worker/gate.py). `append_log` adds to the
    log file instead of starting it (the isolated evaluation after the training process). While `hold()` is true
    the whole process tree is stopped (SIGSTOP, sent again now and then for anything forked in the meantime), then
    continued (SIGCONT); `held_seconds` adds it up. A stop is put off, for up to `hold_defer_max` seconds, while the
    tree holds a lock on a file under `hold_defer_under` (the compile cache, which the run holding the device shares:
    stopped with a kernel's lock, it would keep that run waiting for the lock until it was continued). `stop()`, checked
    every POLL seconds, ends the run at once (`killed="shutdown"`: the worker is shutting down). `disk`: stopped
    (`killed="disk"`, the reason in `disk_full`) when a file system it writes to runs low."""
    run = ChildRun()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
                            close_fds=True)
    assert proc.stdout is not None
    pipe_inode = os.fstat(proc.stdout.fileno()).st_ino
    reader = _Reader(os.dup(proc.stdout.fileno()), log_path, log_cap, run.progress, append=append_log)
    proc.stdout.close()
    reader.start()
    # the first beat at once: the run's previous beat came from the process before this one (the training process
    # before the isolated evaluation, the wait for the device before training), up to an interval ago; a first beat
    # an interval later left a gap past the reaper's 2 x interval, and a live run was re-queued (found by review)
    next_tick = start
    ticker = _Ticker(on_tick) if on_tick is not None else None
    next_mem = start
    held_since: float | None = None
    next_stop = start
    hold_wanted: float | None = None  # when hold() first said so (a stop may be deferred by a lock)
    try:
        while True:
            code = proc.poll()
            if code is not None:
                run.exit_code = code
                break
            if stop is not None and stop():
                run.killed = "shutdown"
                break
            now = time.monotonic()
            if hold is not None:
                if hold():
                    hold_wanted = now if hold_wanted is None else hold_wanted
                    if held_since is None and hold_defer_under is not None and now - hold_wanted < hold_defer_max \
                            and locks_held_under(tree_pids(proc.pid), hold_defer_under):
                        pass  # let it finish building the kernel it holds the lock of
                    elif now >= next_stop:  # a stopped process cannot fork; one forked while the signals went out can
                        held_since = now if held_since is None else held_since
                        signal_tree(proc, signal.SIGSTOP)
                        next_stop = now + (POLL if now - held_since < 1.0 else 1.0)
                else:
                    hold_wanted = None
                    if held_since is not None:
                        signal_tree(proc, signal.SIGCONT)
                        run.held_seconds += now - held_since
                        held_since = None
            if now - start > wall_limit + (extra_time() if extra_time is not None else 0.0):
                run.killed = "timeout"
                break
            if disk is not None:  # every poll: a statvfs is cheap, and a fast disk fills a gigabyte in a second
                run.disk_full = disk.breached()
                if run.disk_full is not None:
                    run.killed = "disk"
                    break
            if memory_mb > 0 and now >= next_mem:
                next_mem = now + MEMORY_POLL
                rss = tree_memory_mb(proc.pid, memory_mb)
                run.peak_rss_mb = max(run.peak_rss_mb, rss)
                if rss > memory_mb:
                    run.killed = "memory"
                    break
            if ticker is not None:
                if ticker.lost:
                    run.killed = "claim_lost"
                    break
                if now >= next_tick:
                    next_tick = now + tick_every
                    ticker.request(run.progress)
            time.sleep(POLL)
    finally:
        if held_since is not None:
            run.held_seconds += time.monotonic() - held_since
        # always: whatever the candidate forked must not outlive the run (SIGKILL ends a stopped process too)
        kill_tree(proc)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        if run.exit_code is None and run.killed is None:
            run.exit_code = code
        run.wall_seconds = time.monotonic() - start
        if ticker is not None:
            ticker.close()
        reader.join(timeout=2)
        if reader.is_alive():
            # the output is still open somewhere: a process that left the tree (it is not ours to wait 10 s for, with
            # no heartbeat meanwhile: the reaper took the claim and the finished run's result was discarded)
            escaped = kill_pipe_holders(pipe_inode)
            if escaped:
                log.warning("killed %d process(es) the run left outside its process tree: %s", len(escaped), escaped)
            reader.join(timeout=5)
    run.tail = reader.lines()
    run.log_bytes = reader.written
    run.log_truncated = reader.truncated
    run.log_error = reader.log_error
    return run
