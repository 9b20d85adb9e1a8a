"""Processes the integration and fault tests start, stop and kill: private Redis servers, the
`farm scheduler` process, and waits on them. Worker processes live in tests/workerkit.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: Path) -> None:
    """A private, empty Redis on loopback (no persistence: a restart comes back empty)."""
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                    "no", "--daemonize", "yes", "--pidfile", str(workdir / "redis.pid"), "--logfile",
                    str(workdir / "redis.log"), "--dir", str(workdir)], check=True)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError("redis did not start")


def stop_redis(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


def start_scheduler(env: dict[str, str], log_dir: Path, name: str = "scheduler") -> subprocess.Popen[bytes]:
    """`farm scheduler` as a subprocess, output appended to log_dir/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
    return subprocess.Popen([sys.executable, "-m", "cli.main", "scheduler"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
