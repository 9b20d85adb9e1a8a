"""`farm worker --gpu N` / `farm worker --cpu`: start one worker process (one per GPU or CPU slot).

Sets the worker's identity in the environment, pins CUDA_VISIBLE_DEVICES (in PCI order, as nvidia-smi
numbers the GPUs), then execs a Celery
worker on the hardware class's queue: `--pool solo -c 1` with one slot, `--pool threads -c N` with N
slots (a GPU worker's default is 2: the next candidate starts and compiles while one trains; the device
gate, worker/gate.py, lets one timed run at a time use the GPU). The Celery process itself probes the
sandbox, prepares the data cache, registers in `workers` and starts its reaper thread
(worker/lifecycle.py) before taking jobs.
"""

from __future__ import annotations

import os
import socket
import sys

import typer

from cli.errors import fail

app = typer.Typer(help="Run a worker.")


def celery_argv(queue: str, node: str, loglevel: str, slots: int = 1) -> list[str]:
    # one slot: the solo pool; more: threads, each job's training runs in its own process anyway
    pool = ["--pool", "solo", "-c", "1"] if slots <= 1 else ["--pool", "threads", "-c", str(slots)]
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queue, *pool, "-n", node,
            "--without-gossip", "--without-mingle", "--loglevel", loglevel]


@app.command()
def worker(
    gpu: int = typer.Option(None, "--gpu", help="GPU index to pin (CUDA_VISIBLE_DEVICES)"),
    cpu: bool = typer.Option(False, "--cpu", help="a cpu-profile worker (no GPU)"),
    slot: int = typer.Option(0, "--slot", help="CPU slot number, when several cpu workers share a host"),
    hw_class: str = typer.Option("", "--hw-class", envvar="FARM_WORKER_HW_CLASS",
                                 help="queue/hardware class (default: from the GPU name, e.g. gpu.h200, or `cpu`)"),
    name: str = typer.Option("", "--name", help="worker id (default: HOST:gpuN or HOST:cpuN)"),
    prepare: bool = typer.Option(True, "--prepare/--no-prepare", help="run the template's prepare.py first"),
    slots: int = typer.Option(0, "--slots", min=0, max=4,
                              help="jobs held at once: 2 starts and compiles the next candidate while one trains, "
                                   "one timed run on the device at a time (default: FARM_WORKER_SLOTS, else 2 with "
                                   "--gpu, 1 with --cpu)"),
    loglevel: str = typer.Option("INFO", "--loglevel"),
) -> None:
    """Consume this hardware class's queue, one experiment at a time."""
    from worker.identity import hw_class_of, query_gpu

    if (gpu is None) == (not cpu):
        fail("choose exactly one of --gpu N or --cpu")
    env = dict(os.environ)
    host = socket.gethostname()
    if gpu is not None:
        info = query_gpu(gpu)
        if not info:
            fail(f"no GPU {gpu} found (nvidia-smi --id={gpu} failed); use --cpu for the cpu profile")
        # N is nvidia-smi's index (PCI order); CUDA's default order is fastest first, so on a host with mixed
        # GPUs CUDA_VISIBLE_DEVICES=N alone could pin another card than the one identified above
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(gpu), FARM_WORKER_GPU=str(gpu))
        cls = hw_class or hw_class_of(info["gpu_name"])
        worker_id = name or f"{host}:gpu{gpu}"
    else:
        env.pop("FARM_WORKER_GPU", None)
        env["CUDA_VISIBLE_DEVICES"] = ""  # a cpu worker never touches a GPU
        env["FARM_WORKER_SLOT"] = str(slot)
        cls = hw_class or "cpu"
        worker_id = name or f"{host}:cpu{slot}"
    env.update(FARM_WORKER_ID=worker_id, FARM_WORKER_HW_CLASS=cls, FARM_WORKER_PREPARE="1" if prepare else "0")
    if not slots:  # the setting (the environment, then .env: os.environ alone missed a .env value)
        from farm.settings import get_settings

        slots = get_settings().worker_slots or (2 if gpu is not None else 1)
    env["FARM_WORKER_SLOTS"] = str(slots)
    from farm.broker import queue_for

    node = worker_id.replace(":", "-") + "@" + host
    typer.echo(f"farm worker {worker_id}: queue {queue_for(cls)}", err=True)
    argv = celery_argv(queue_for(cls), node, loglevel, slots)
    os.execve(argv[0], argv, env)
