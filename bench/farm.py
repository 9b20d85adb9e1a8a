"""Farm throughput: real `farm worker --cpu` processes (Celery), `farm scheduler`, Postgres, Redis and
real cpu-profile training runs of training_template/ with a short budget, W workers.

Prints per experiment and in total: queue wait while its worker was free, workdir setup, child
start-up (python + torch import + compile, as the template reports it), training, evaluation,
sandbox + exit, report, decision latency; duty cycle = training / (W x wall); experiments per
hour; and the projection to the 300 s budget. Every figure comes from what the database already
records (queued_at, started_at, finished_at, decided_at, results.timings, the template's own
startup/training/eval seconds); only the result write is derived: claim-to-finished minus the
worker's measured setup, child and report seconds.

    python bench/farm.py --workers 1,2 [--slots 1,2] [--experiments N] [--budget 5] [--max-steps S]

`--slots 2` runs each worker with two job slots (the GPU default): the next candidate starts while one
trains and the device gate hands over the device when the holder exits (worker/gate.py). Start-up is
then hidden, so the bench also measures, per worker, the gap from one run's last timed step to the next
run's first timed step (evaluation, exit, hand-over, untimed steps after the gate, any start-up not
hidden, any wait for a proposal) and projects the 300 s budget from that gap.

Starts its own Postgres + Redis (scripts/services.sh) unless FARM_TEST_PG_URL / FARM_TEST_REDIS_URL
are set. Figures land in artifacts/bench_farm.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench._services import cpu_name, drop_database, fresh_database, services  # noqa: E402

REFERENCE_OUTSIDE = 26.0  # s of each 326 s reference run outside training on an H100 (start-up, compile, eval)
COLS = ["queue_wait", "setup", "startup", "gate_wait", "training", "eval", "sandbox_exit", "report", "decision"]
FARM = ["queue_wait", "setup", "sandbox_exit", "report"]  # what the farm controls on the worker's time


def _env(db_url: str, redis_url: str, home: Path, max_steps: int | None, slots: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_") or k.startswith("FARM_TEST_")}
    env.update(FARM_DATABASE_URL=db_url, FARM_BROKER_URL=redis_url, FARM_HOME=str(home), FARM_ENV="development",
               FARM_HEARTBEAT_INTERVAL="2", FARM_SCHEDULER_INTERVAL="0.5", FARM_LOOKAHEAD="1",
               FARM_WORKER_MEMORY_MB="3000", FARM_WORKER_SLOTS=str(slots), PYTHONUNBUFFERED="1",
               LITELLM_LOCAL_MODEL_COST_MAP="True")
    if max_steps:
        env["FARM_MAX_STEPS"] = str(max_steps)
    return env


def run(workers: int, slots: int, experiments: int, budget: float, max_steps: int | None, admin: str,
        redis_url: str) -> dict[str, Any]:
    import redis
    from sqlalchemy import select

    from farm.db import db_now, dispose_engines, session_scope
    from farm.models import Experiment, Program, ProgramStatus, Result
    from farm.programs import create_program
    from farm.settings import reset_settings_cache
    from tests.procs import start_scheduler, stop_process
    from tests.workerkit import start_worker, wait_registered

    db_url = fresh_database(admin)
    redis.Redis.from_url(redis_url).flushdb()
    tmp = tempfile.TemporaryDirectory(prefix="farm-bench-")
    home = Path(tmp.name) / "home"
    env = _env(db_url, redis_url, home, max_steps, slots)
    saved = dict(os.environ)
    os.environ.update(env)
    reset_settings_cache()
    dispose_engines()
    procs = []
    try:
        with session_scope() as s:
            p = create_program(s, name=f"bench-w{workers}-s{slots}", instructions="# tune", profile="cpu", time_budget=budget,
                               proposer={"kind": "mutation"}, policy={"baseline_runs": 1},
                               stop_rules={"max_experiments": experiments})
            pid = p.id
        logs = Path(tmp.name) / "logs"
        names = [f"bench:cpu{i}" for i in range(workers)]
        procs = [start_worker(env, n, logs, slot=i) for i, n in enumerate(names)]
        for n, proc in zip(names, procs, strict=True):
            wait_registered(n, proc, logs, timeout=300)
        with session_scope() as s:
            t_start = db_now(s)
        procs.append(start_scheduler(env, logs))
        deadline = time.monotonic() + 60 * 30
        while time.monotonic() < deadline:
            with session_scope() as s:
                prog = s.get(Program, pid)
                assert prog is not None
                if prog.status == ProgramStatus.finished:
                    break
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(f"a farm process exited ({proc.args}); logs in {logs}")
            time.sleep(1.0)
        else:
            raise SystemExit("the program did not finish in 30 minutes")
        with session_scope() as s:
            exps = list(s.execute(select(Experiment).where(Experiment.program_id == pid,
                                                           Experiment.started_at.is_not(None))
                                  .order_by(Experiment.started_at)).scalars())
            results = {r.experiment_id: r for r in s.execute(select(Result)).scalars()}
            rows = _rows(exps, results, t_start, slots)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        os.environ.clear()
        os.environ.update(saved)
        reset_settings_cache()
        drop_database(admin, db_url)
        tmp.cleanup()
    return _summary(workers, slots, budget, rows, t_start)


def _rows(exps: list[Any], results: dict[int, Any], t_start: Any, slots: int) -> list[dict[str, Any]]:
    finished: dict[str, list[Any]] = {}  # per worker, the finish times of its runs started so far
    rows = []
    for e in exps:
        r = results.get(e.id)
        if r is None or e.finished_at is None or e.worker_id is None:
            continue
        t = r.timings or {}
        # a slot of its worker was free since the start, or since the run that freed the slot it took ended
        prior = sorted(finished.setdefault(e.worker_id, []))
        free = t_start if len(prior) < slots else prior[len(prior) - slots]
        queued = e.queued_at or e.started_at
        wait = max(0.0, (e.started_at - max(queued, free)).total_seconds())
        starved = max(0.0, (queued - free).total_seconds())  # a slot idle, nothing queued for it yet
        finished[e.worker_id].append(e.finished_at)
        setup = t.get("claim_seconds", 0.0) + t.get("setup_seconds", 0.0)
        child = t.get("child_seconds", 0.0)
        startup, training, ev, gate = (float(t.get(k) or 0.0) for k in (
            "startup_seconds", "training_seconds", "eval_seconds", "gate_wait_seconds"))
        record = (e.finished_at - e.started_at).total_seconds() - t.get("setup_seconds", 0.0) - child \
            - t.get("report_seconds", 0.0)
        # the timed window on the worker's clock (the harness reports when its timing started)
        train_start = t.get("training_started_at")
        rows.append({
            "id": e.id, "worker": e.worker_id, "status": e.status.value, "reason": e.status_reason, "val_bpb": r.val_bpb,
            "queue_wait": wait, "starved": starved, "setup": setup, "startup": startup, "gate_wait": gate,
            "training": training, "eval": ev, "sandbox_exit": max(0.0, child - startup - gate - training - ev),
            "report": t.get("report_seconds", 0.0) + max(0.0, record),
            "decision": (e.decided_at - e.finished_at).total_seconds() if e.decided_at else None,
            "queued": queued, "started": e.started_at, "finished": e.finished_at, "free": free,
            "overlapped": bool(t.get("overlapped")),
            "train_start": train_start, "train_end": train_start + training if train_start is not None else None})
    return rows


def _gaps(rows: list[dict[str, Any]]) -> list[float]:
    """Per worker, seconds from one run's last timed step to the next run's first: what its device spent
    outside training between two runs, whatever the cause."""
    out: list[float] = []
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["train_start"] is not None:
            by_worker.setdefault(r["worker"], []).append(r)
    for runs in by_worker.values():
        runs.sort(key=lambda r: r["train_start"])
        out += [b["train_start"] - a["train_end"] for a, b in zip(runs, runs[1:], strict=False)]
    return out


def _summary(workers: int, slots: int, budget: float, rows: list[dict[str, Any]], t_start: Any) -> dict[str, Any]:
    n = len(rows)
    wall = (max(r["finished"] for r in rows) - t_start).total_seconds()
    training = sum(r["training"] for r in rows)

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.fmean(vals) if vals else 0.0

    farm = sum(mean(k) for k in FARM)
    template = mean("startup") + mean("eval")
    starved = sum(r["starved"] for r in rows) / n
    gaps = _gaps(rows)
    gap = statistics.fmean(gaps) if gaps else None
    out = {"workers": workers, "slots": slots, "budget": budget, "experiments": n, "wall_seconds": wall,
           "gaps": gaps, "gap_mean": gap, "overlapped": sum(1 for r in rows if r["overlapped"]),
           "training_seconds": training, "duty_cycle": training / (workers * wall),
           "experiments_per_hour": n / wall * 3600, "means": {k: mean(k) for k in [*COLS, "starved"]},
           "farm_overhead": farm, "starved_per_experiment": starved, "template_outside_training": template}
    projections = [("farm_only", farm), ("measured_here", farm + template), ("reference_h100", farm + REFERENCE_OUTSIDE)]
    if gap is not None:
        projections.append(("measured_gaps", gap))
    for label, outside in projections:
        per = 300.0 + outside
        out[f"projection_{label}"] = {"overhead_seconds": outside, "duty_cycle": 300.0 / per,
                                      "experiments_per_gpu_hour": 3600.0 / per}
    out["rows"] = [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()} for r in rows]
    return out


def report(s: dict[str, Any]) -> None:
    w = s["workers"]
    print(f"\n== W={w} worker(s) x {s['slots']} slot(s), budget {s['budget']:g} s, {s['experiments']} experiments, "
          f"wall {s['wall_seconds']:.1f} s, {s['overlapped']} started while another run held the device")
    head = f"{'exp':>4} {'worker':>11} {'status':>9} " + " ".join(f"{c:>12}" for c in COLS)
    print(head)
    for r in s["rows"]:
        cells = " ".join(f"{r[c]:12.3f}" if r[c] is not None else f"{'-':>12}" for c in COLS)
        print(f"{r['id']:>4} {r['worker']:>11} {r['status']:>9} {cells}")
    for r in s["rows"]:
        if r["status"] != "succeeded":
            print(f"  exp {r['id']} {r['status']}: {r['reason']}")
    m = s["means"]
    print(f"{'mean':>26} " + " ".join(f"{m[c]:12.3f}" for c in COLS))
    print(f"farm-controlled overhead per experiment (queue wait + setup + sandbox/exit + report): "
          f"{s['farm_overhead']:.3f} s   (target < 0.5 s)")
    print(f"worker idle with nothing queued for it, per experiment: {s['starved_per_experiment']:.3f} s")
    print(f"decision latency (finished -> decided), mean: {m['decision']:.3f} s")
    print(f"duty cycle = training / (W x wall) = {s['training_seconds']:.1f} / ({w} x {s['wall_seconds']:.1f}) "
          f"= {100 * s['duty_cycle']:.1f} %")
    print(f"experiments per hour: {s['experiments_per_hour']:.1f} ({s['experiments_per_hour'] / w:.1f} per worker)")
    if s["gap_mean"] is not None:
        gaps = ", ".join(f"{g:.2f}" for g in s["gaps"])
        print(f"device time between one run's last timed step and the next's first (per worker): mean "
              f"{s['gap_mean']:.2f} s ({gaps})")
    for label, text in (("farm_only", "farm overhead only"),
                        ("measured_here", "farm + this CPU's start-up and eval, all exposed"),
                        ("reference_h100", f"farm + the reference's {REFERENCE_OUTSIDE:g} s H100 start-up+eval"),
                        ("measured_gaps", "the measured gap between timed runs")):
        if f"projection_{label}" not in s:
            continue
        p = s[f"projection_{label}"]
        print(f"projection to 300 s, {text}: {p['overhead_seconds']:.2f} s overhead/experiment, duty cycle "
              f"{100 * p['duty_cycle']:.1f} %, {p['experiments_per_gpu_hour']:.2f} experiments per GPU-hour")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--slots", default="1", help="comma-separated job slots per worker (default 1; 2 = start the "
                                                 "next run while one trains, the GPU default)")
    ap.add_argument("--experiments", type=int, default=0, help="experiments per run (default max(3, 2W))")
    ap.add_argument("--budget", type=float, default=5.0, help="training seconds per experiment (default 5)")
    ap.add_argument("--max-steps", type=int, default=0, help="FARM_MAX_STEPS for the runs (default none)")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    print(f"bench/farm.py: {cpu_name()}, {os.cpu_count()} CPUs, no GPU; cpu profile of training_template/")
    out = []
    with services() as (admin, redis_url):
        for slots in [int(x) for x in args.slots.split(",") if x.strip()]:
            for w in counts:
                s = run(w, slots, args.experiments or max(3, 2 * w), args.budget, args.max_steps or None, admin,
                        redis_url)
                report(s)
                out.append(s)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "bench_farm.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
