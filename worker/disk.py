"""What a worker leaves on disk: workdirs of runs it no longer has, and its compile cache.

A run's workdir is removed when the run ends, but a worker killed mid-run (SIGKILL, the OOM killer, a
reboot) leaves it behind with whatever the candidate wrote there; the next start of the same worker
sweeps them. The compile cache is writable by every candidate (that is what keeps compiles warm), and a
file-size limit caps one file, not how many: past FARM_COMPILE_CACHE_MB it is emptied.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path

log = logging.getLogger("farm.worker")

COMPILE_CACHE_MB = 20_000.0  # the template's own compiles take a few hundred MB; far above that is junk

_active = 0  # runs of this process between begin_run() and end_run()
_lock = threading.Lock()


def workdir_name(slug: str, experiment: int, retry: int, token: str) -> str:
    return f"{slug}-e{experiment}-r{retry}-{token}"


def sweep_workdirs(workdirs: Path, slug: str) -> int:
    """Remove this worker's workdirs (its runs are all over when it starts). Returns how many."""
    pattern = re.compile(rf"{re.escape(slug)}-e\d+-r\d+-[0-9a-f]+(-eval)?")  # -eval: the isolated evaluation's
    gone = 0
    for p in workdirs.glob(f"{slug}-e*"):
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone += 1
    if gone:
        log.warning("removed %d workdir(s) left by an earlier run of this worker", gone)
    return gone


def tree_mb(root: Path) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total / 2**20


def trim_compile_cache(cache: Path, limit_mb: float) -> bool:
    """Empty the cache when it holds more than limit_mb (kept folders, removed contents). True if emptied."""
    size = tree_mb(cache)
    if size <= limit_mb:
        return False
    for child in cache.iterdir() if cache.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            child.mkdir(exist_ok=True)
        else:
            child.unlink(missing_ok=True)
    log.warning("compile cache %s held %.0f MB, over FARM_COMPILE_CACHE_MB=%.0f: emptied", cache, size, limit_mb)
    return True


def begin_run() -> None:
    global _active
    with _lock:
        _active += 1


def end_run(cache: Path, limit_mb: float) -> None:
    """A run ended: trim the cache if no other run of this process could be compiling into it now."""
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            try:
                trim_compile_cache(cache, limit_mb)
            except OSError as exc:
                log.warning("compile cache %s: not trimmed: %s", cache, exc)
