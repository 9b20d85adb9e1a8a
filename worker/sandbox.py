"""The sandbox a candidate's training process runs in.

A candidate is code an LLM wrote; it must not reach the farm's state. Methods, best first:

  bwrap    bubblewrap: own network, PID, IPC and UTS namespaces (no loopback services, and every
           process the candidate forks dies with the sandbox); the root filesystem read-only;
           the farm home, database and broker folders hidden under empty tmpfs mounts; only its
           workdir (and the compile cache) writable; the harness files read-only inside the
           workdir; all capabilities dropped, so even as root it cannot undo a mount. Its /dev is
           fresh (null, zero, urandom, ...) plus the host's GPU device nodes, bound back so that
           CUDA still finds the GPU the worker was given.
  unshare  `unshare -n` (root) or `unshare -rn`: network isolation only (no filesystem isolation).
  none     nothing: the worker runs, but says so loudly at start-up and in `workers.sandbox_ok`.

`probe()` decides once at start-up by running a real sandboxed `true`; only `bwrap` counts as ok.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METHODS = ("bwrap", "unshare", "none")


@dataclass(frozen=True)
class Mounts:
    """What the sandbox exposes besides the read-only root filesystem."""

    workdir: Path
    writable: tuple[Path, ...] = ()  # bound read-write (the compile cache)
    readonly: tuple[Path, ...] = ()  # bound read-only on top of hidden paths (data, cache)
    readonly_in_workdir: tuple[Path, ...] = ()  # harness files: read-only inside the workdir
    hidden: tuple[Path, ...] = ()  # replaced by empty tmpfs (dirs) or /dev/null (files)
    masked: tuple[Path, ...] = ()  # files replaced by /dev/null after every bind (inside a read-only bind)


@dataclass(frozen=True)
class Sandbox:
    method: str
    ok: bool
    detail: str

    def describe(self) -> str:
        return f"{self.method}: {self.detail}"

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        if self.method == "bwrap":
            return bwrap_argv(argv, mounts)
        if self.method == "unshare":
            return [*unshare_prefix(), *argv]
        return list(argv)


def unshare_prefix() -> list[str]:
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


def runtime_paths() -> tuple[Path, ...]:
    """Where the Python that runs candidates lives (the venv and its base interpreter)."""
    return tuple(sorted({Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}))


# The device nodes CUDA opens (the GPU itself is chosen by CUDA_VISIBLE_DEVICES, set by the worker):
# bwrap's fresh /dev has none of them, so without these every CUDA run saw no GPU.
GPU_DEVICE_GLOBS = ("nvidia*", "nvidia-caps", "dri")


def gpu_device_nodes(dev: Path = Path("/dev")) -> list[Path]:
    return sorted({p for g in GPU_DEVICE_GLOBS for p in dev.glob(g)})


def _covered(p: Path, roots: Sequence[Path]) -> bool:
    return any(p == r or r in p.parents for r in roots)


# The run's /tmp is memory the resident-memory watchdog does not see: capped where bwrap can (--size, bubblewrap 0.7+)
TMP_SIZE_MB = 2048


@functools.lru_cache(maxsize=1)
def bwrap_takes_size() -> bool:
    try:
        out = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in out.stdout + out.stderr


def bwrap_argv(argv: Sequence[str], m: Mounts, dev: Path = Path("/dev")) -> list[str]:
    cmd = ["bwrap", "--die-with-parent", "--new-session",
           "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--cap-drop", "ALL",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           *(["--size", str(TMP_SIZE_MB << 20)] if bwrap_takes_size() else []), "--tmpfs", "/tmp"]
    for node in gpu_device_nodes(dev):
        cmd += ["--dev-bind", str(node), f"/dev/{node.name}"]
    # parents before children, so a later mount is never hidden by an earlier tmpfs
    for p in sorted({Path(p) for p in m.hidden}, key=lambda p: len(p.parts)):
        if p.is_dir():
            cmd += ["--tmpfs", str(p)]
        elif p.exists():
            cmd += ["--ro-bind", "/dev/null", str(p)]
    # the interpreter must stay reachable when it lives under a path hidden above (a checkout in /tmp,
    # as CI clones can be): bind it back read-only; it is code, not farm state
    hidden_roots = [Path("/tmp"), *(Path(p) for p in m.hidden)]
    for p in runtime_paths():
        if _covered(p, hidden_roots) and p.exists():
            cmd += ["--ro-bind", str(p), str(p)]
    for p in m.readonly:
        if p.exists():
            cmd += ["--ro-bind", str(p), str(p)]
    for p in m.writable:
        cmd += ["--bind", str(p), str(p)]
    cmd += ["--bind", str(m.workdir), str(m.workdir)]
    for p in m.readonly_in_workdir:
        if p.exists():
            cmd += ["--ro-bind", str(p), str(p)]
    for p in m.masked:
        if p.is_file():
            cmd += ["--ro-bind", "/dev/null", str(p)]
    # the empty tmpfs over a hidden folder was writable, without a size: memory a run could fill unseen (found by
    # review). Read-only once everything is bound inside it (not recursive: a workdir bound below stays writable)
    for p in sorted({Path(p) for p in m.hidden if Path(p).is_dir()}, key=lambda p: len(p.parts)):
        cmd += ["--remount-ro", str(p)]
    cmd += ["--chdir", str(m.workdir), "--", *argv]
    return cmd


def _try(cmd: list[str]) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return True, proc.stdout.strip()


def probe(requested: str = "auto", scratch: Path | None = None) -> Sandbox:
    """Find the best sandbox this host allows by running `true` in it (or `requested` only)."""
    tried: list[str] = []
    if requested in ("auto", "bwrap"):
        if shutil.which("bwrap"):
            # as runs use it: a workdir bound inside a hidden folder (the farm home), made read-only after
            with tempfile.TemporaryDirectory(prefix="farm-probe-", dir=scratch) as tmp:
                work = Path(tmp) / "home" / "work"
                work.mkdir(parents=True)
                ok, why = _try(bwrap_argv(["sh", "-c", "touch x && ! touch ../y 2>/dev/null"],
                                          Mounts(workdir=work, hidden=(work.parent,))))
            if ok:
                who = "root without capabilities" if os.geteuid() == 0 else f"uid {os.geteuid()}"
                return Sandbox("bwrap", True, f"bubblewrap: no network, own PID namespace, farm home "
                                              f"hidden, read-only root, as {who}")
            tried.append(f"bwrap failed ({why})")
        else:
            tried.append("bwrap not installed")
        if requested == "bwrap":
            return Sandbox("none", False, "; ".join(tried))
    if requested in ("auto", "unshare"):
        if shutil.which("unshare"):
            ok, why = _try([*unshare_prefix(), "true"])
            if ok:
                return Sandbox("unshare", False, "; ".join([*tried, "network namespace only (unshare): "
                                                            "the candidate can read the filesystem"]))
            tried.append(f"unshare failed ({why})")
        else:
            tried.append("unshare not installed")
    return Sandbox("none", False, "; ".join([*tried, "NO SANDBOX: candidates run with the worker's "
                                              "network and filesystem access"]))
