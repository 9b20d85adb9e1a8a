"""Who this worker is: its id, hardware class and versions, and its row in `workers`.

The process learns its identity from the environment `farm worker` sets before it starts Celery
(FARM_WORKER_ID, FARM_WORKER_HW_CLASS, FARM_WORKER_GPU), so a plain
`celery -A worker.app worker -Q cpu --pool solo` also works with sensible defaults.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from farm.models import Worker, utcnow


@dataclass(frozen=True)
class Identity:
    worker_id: str
    host: str
    hw_class: str
    gpu_index: int | None = None
    gpu_name: str | None = None
    gpu_memory_mb: float | None = None
    driver_version: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None


def hw_class_of(gpu_name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> gpu.h100, `NVIDIA A100-SXM4-40GB` -> gpu.a100."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", gpu_name.upper().replace("-", " "))
    return f"gpu.{(m.group(1) if m else gpu_name.split()[-1]).lower()}"


def query_gpu(index: int) -> dict[str, Any]:
    """Name, memory and driver of one GPU via nvidia-smi (empty when there is none)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True).stdout
        name, mem, driver = (x.strip() for x in out.strip().splitlines()[0].split(","))
        return {"gpu_name": name, "gpu_memory_mb": float(mem), "driver_version": driver}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def _torch_versions(gpu: bool) -> tuple[str | None, str | None]:
    try:
        version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None, None
    cuda = None
    if gpu:  # importing torch costs seconds: only where the CUDA version matters
        try:
            import torch

            cuda = torch.version.cuda
        except Exception:  # noqa: BLE001 - a broken torch install is reported, not fatal here
            cuda = None
    return version, cuda


def detect(env: dict[str, str] | None = None) -> Identity:
    e = os.environ if env is None else env
    host = socket.gethostname()
    gpu_raw = e.get("FARM_WORKER_GPU", "")
    gpu_index = int(gpu_raw) if gpu_raw.strip().isdigit() else None
    info = query_gpu(gpu_index) if gpu_index is not None else {}
    hw_class = e.get("FARM_WORKER_HW_CLASS") or (
        hw_class_of(info["gpu_name"]) if info.get("gpu_name") else "cpu")
    default_id = f"{host}:gpu{gpu_index}" if gpu_index is not None else f"{host}:cpu{e.get('FARM_WORKER_SLOT', '0')}"
    torch_version, cuda_version = _torch_versions(gpu_index is not None)
    return Identity(worker_id=e.get("FARM_WORKER_ID") or default_id, host=host, hw_class=hw_class,
                    gpu_index=gpu_index, torch_version=torch_version, cuda_version=cuda_version, **info)


def register(session: Session, ident: Identity, *, sandbox: str, sandbox_ok: bool, slots: int = 1,
             heartbeat_interval: float | None = None) -> Worker:
    """Insert or refresh this worker's row (a restarted worker keeps its id)."""
    row = session.get(Worker, ident.worker_id)
    values = asdict(ident)
    values.pop("worker_id")
    if row is None:
        row = Worker(id=ident.worker_id, **values)
        session.add(row)
    else:
        for k, v in values.items():
            setattr(row, k, v)
    row.pid = os.getpid()
    row.sandbox = sandbox[:200]
    row.sandbox_ok = sandbox_ok
    row.slots = slots
    row.heartbeat_interval = heartbeat_interval
    row.current_experiment_id = None
    row.started_at = utcnow()
    row.last_heartbeat = utcnow()
    row.stopped_at = None
    session.flush()
    return row


def touch(session: Session, worker_id: str) -> None:
    """Stamp the worker's liveness with the database clock (between jobs too)."""
    session.execute(update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None))
                    .values(last_heartbeat=utcnow()))


def mark_stopped(session: Session, worker_id: str) -> None:
    row = session.get(Worker, worker_id)
    if row is not None:
        row.stopped_at = utcnow()
        row.current_experiment_id = None
