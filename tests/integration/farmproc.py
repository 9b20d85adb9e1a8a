"""Helpers for tests that run the `farm` command as a real process tree (farm up, farm demo).

The process gets a clean environment: no FARM_* from the developer's shell, a private FARM_HOME,
a free API port, and this checkout first on PYTHONPATH (the children it starts inherit it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**farm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_") or k.startswith("FARM_TEST_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.update(farm)
    return env


class FarmProcess:
    """`python -m cli.main ARGS` in its own session, output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FarmProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", *self.args], cwd=ROOT, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill_tree(self) -> None:
        """Last-resort cleanup: the whole tree, whatever state the test left it in."""
        if self.proc is None:
            return
        tree = [*descendants(self.proc.pid), self.proc.pid]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for c in children(stack.pop()):
            out.append(c)
            stack.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def child_running(parent: int, *words: str) -> int | None:
    for pid in children(parent):
        cmd = cmdline(pid)
        if all(w in cmd for w in words):
            return pid
    return None


def wait_for(cond: Callable[[], Any], timeout: float, what: str, diag: Callable[[], str] = lambda: "",
             poll: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{diag()}")


def wait_healthy(url: str, proc: FarmProcess, timeout: float = 120.0) -> None:
    def ok() -> bool:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise AssertionError(f"farm exited with {proc.proc.returncode}:\n{proc.output()[-4000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout, "the API's /healthz", proc.output)


def logs_tail(home: Path, lines: int = 25) -> str:
    out = []
    for log in sorted((home / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)
