"""The scheduler alone against a simulated fleet: 64 worker threads (claim with farm.states.claim,
sleep a few seconds, farm.states.record_result; registered in `workers` with fresh heartbeats) and
an OpenAI-compatible server on loopback that answers every proposal after 2 s (tests/llm_server.py).

Prints idle worker-seconds spent waiting for a proposal: idle workers the queue held nothing for, summed by
the dispatcher at each look (target under 1 % of capacity); all idle time beside it (claims on their way too);
proposals per minute, and database queries per decision (a before_cursor_execute counter on the scheduler's
own engine; the simulated workers use another engine).

    python bench/scheduler_scale.py [--workers 64] [--job 5] [--latency 2] [--seconds 90]
                                    [--lookahead 64] [--concurrency 64]

Starts its own Postgres + Redis (scripts/services.sh) unless FARM_TEST_PG_URL / FARM_TEST_REDIS_URL
are set. Figures land in artifacts/bench_scheduler_scale.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench._services import cpu_name, drop_database, fresh_database, services  # noqa: E402

HW = "cpu"


def answer(i: int) -> str:
    """A distinct, valid search/replace edit of training_template/train.py for each request."""
    lr = 0.04 + (i + 1) * 1e-5
    return (f"DESCRIPTION: matrix learning rate {lr:.5f}\nRATIONALE: scripted.\nEDITS:\ntrain.py\n"
            "<<<<<<< SEARCH\nMATRIX_LR = 0.04  # Muon, every 2-D block matrix\n=======\n"
            f"MATRIX_LR = {lr:.5f}  # Muon, every 2-D block matrix\n>>>>>>> REPLACE\n")


class Fleet:
    """Simulated workers. Like Celery workers blocked on a broker, an idle worker costs nothing: one
    dispatcher thread claims queued experiments (farm.states.claim) for idle workers, each worker
    thread sleeps its job and records the result, one thread stamps every heartbeat once a second
    (the workers' rows and their running experiments, database clock)."""

    def __init__(self, n: int, job: float, engine: Any) -> None:
        self.n, self.job, self.engine = n, job, engine
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.idle_q: queue.Queue[str] = queue.Queue()
        self.inbox = {f"sim:{i}": queue.Queue[int]() for i in range(n)}
        self.idle_since: dict[str, float] = {}
        self.idle = 0.0  # worker-seconds with nothing to run
        self.starved = 0.0  # ... of which the queue held nothing for them: waiting for a proposal
        self.samples: list[tuple[int, int]] = []  # (idle workers, queued experiments), twice a second
        self.busy = 0.0
        self.done = 0
        self.measuring = False
        self.t0 = 0.0

    def register(self) -> None:
        from farm.db import session_scope
        from farm.models import Worker

        with session_scope(self.engine) as s:
            for wid in self.inbox:
                s.add(Worker(id=wid, host="sim", hw_class=HW, sandbox="none"))
        now = time.monotonic()
        for wid in self.inbox:
            self.idle_since[wid] = now
            self.idle_q.put(wid)

    def threads(self) -> list[threading.Thread]:
        out = [threading.Thread(target=self.dispatcher, daemon=True),
               threading.Thread(target=self.heartbeats, daemon=True),
               threading.Thread(target=self.sampler, daemon=True)]
        out += [threading.Thread(target=self.worker, args=(wid,), daemon=True) for wid in self.inbox]
        return out

    def dispatcher(self) -> None:
        from sqlalchemy import select

        from farm import states
        from farm.db import session_scope
        from farm.models import Experiment, ExperimentStatus

        def hand(exp_id: int, wid: str) -> bool:
            with session_scope(self.engine) as s:
                ok = states.claim(s, exp_id, wid)
            if not ok:
                self.idle_q.put(wid)
                return False
            with self.lock:
                if self.measuring:
                    self.idle += time.monotonic() - max(self.idle_since[wid], self.t0)
            self.inbox[wid].put(exp_id)
            return True

        # Real workers claim in parallel, each from its own process: claims run on a few threads here,
        # so one serial dispatcher does not make workers wait beside a full queue.
        last = time.monotonic()
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="claim") as pool:
            while not self.stop.is_set():
                handed = 0
                now = time.monotonic()
                if not self.idle_q.empty():
                    idle_now = self.idle_q.qsize()
                    with session_scope(self.engine) as s:
                        ids = list(s.execute(select(Experiment.id)
                                             .where(Experiment.status == ExperimentStatus.queued)
                                             .order_by(Experiment.id).limit(idle_now)).scalars())
                    with self.lock:  # idle workers the queue had nothing for, since the last look
                        if self.measuring:
                            self.starved += max(0, idle_now - len(ids)) * (now - max(last, self.t0))
                    pairs = []
                    for exp_id in ids:
                        try:
                            pairs.append((exp_id, self.idle_q.get_nowait()))
                        except queue.Empty:
                            break
                    handed = sum(pool.map(lambda pair: hand(*pair), pairs))
                last = now
                if not handed:
                    self.stop.wait(0.05)

    def sampler(self) -> None:
        """Twice a second while measuring: idle workers and queued experiments. Idle workers beside a
        non-empty queue are the simulated fleet's own lag (claiming), not a lack of proposals."""
        from sqlalchemy import func, select

        from farm.db import session_scope
        from farm.models import Experiment, ExperimentStatus

        while not self.stop.wait(0.5):
            if not self.measuring:
                continue
            with session_scope(self.engine) as s:
                queued = s.execute(select(func.count()).select_from(Experiment)
                                   .where(Experiment.status == ExperimentStatus.queued)).scalar_one()
            self.samples.append((self.idle_q.qsize(), int(queued)))

    def heartbeats(self) -> None:
        from sqlalchemy import select, update

        from farm.db import session_scope
        from farm.models import Experiment, ExperimentStatus, Worker, utcnow

        while not self.stop.wait(1.0):
            # rows a claim or a report holds right now are skipped (they are being stamped anyway);
            # a plain multi-row UPDATE deadlocks against those row locks
            running = (select(Experiment.id).where(Experiment.status == ExperimentStatus.running)
                       .order_by(Experiment.id).with_for_update(skip_locked=True))
            sims = select(Worker.id).where(Worker.host == "sim").order_by(Worker.id).with_for_update(skip_locked=True)
            try:
                with session_scope(self.engine) as s:
                    s.execute(update(Experiment).where(Experiment.id.in_(running.scalar_subquery()))
                              .values(heartbeat_at=utcnow()))
                with session_scope(self.engine) as s:
                    s.execute(update(Worker).where(Worker.id.in_(sims.scalar_subquery()))
                              .values(last_heartbeat=utcnow()))
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried in a second
                print("heartbeat:", str(exc).splitlines()[0])

    def worker(self, wid: str) -> None:
        from farm import states
        from farm.db import session_scope
        from farm.models import Experiment, ExperimentRole, ExperimentStatus

        rng = random.Random(wid)
        box = self.inbox[wid]
        while not self.stop.is_set():
            try:
                exp_id = box.get(timeout=0.5)
            except queue.Empty:
                continue
            t0 = time.monotonic()
            self.stop.wait(self.job)
            with session_scope(self.engine) as s:
                role = s.get(Experiment, exp_id).role  # type: ignore[union-attr]
                # candidates are a little worse than the head: every one is judged and discarded, so
                # the head (and the scripted edit's SEARCH text) never moves
                val = 1.0 + rng.gauss(0, 0.0005) + (0.0 if role == ExperimentRole.baseline else 0.01)
                states.record_result(s, exp_id, wid, ExperimentStatus.succeeded, hw_class=HW, val_bpb=val)
            now = time.monotonic()
            with self.lock:
                if self.measuring:
                    self.busy += now - max(t0, self.t0)
                    self.done += 1
                self.idle_since[wid] = now
            self.idle_q.put(wid)

    def reset(self) -> None:
        with self.lock:
            self.t0 = time.monotonic()
            self.idle = self.busy = self.starved = 0.0
            self.done = 0
            self.measuring = True

    def finish(self) -> tuple[float, float, int]:
        """Stop measuring; workers still idle count up to now."""
        with self.lock:
            now = time.monotonic()
            while not self.idle_q.empty():
                wid = self.idle_q.get_nowait()
                self.idle += now - max(self.idle_since[wid], self.t0)
            self.measuring = False
            return self.idle, self.busy, self.done


def scheduler_child(stats_path: str, profile: str | None) -> None:
    """The scheduler in a process of its own, as in production (the fleet and the LLM server are other
    machines there; in one process they would share the scheduler's GIL). SIGUSR1 marks the start of the
    measured window, SIGTERM its end; counters at both marks go to stats_path as JSON."""
    import signal

    import litellm  # once, up front: a running scheduler has it imported
    from sqlalchemy import event

    from farm.db import make_engine
    from farm.settings import get_settings
    from scheduler.loop import Scheduler
    litellm.suppress_debug_info = True
    engine = make_engine(get_settings().database_url)
    counters: dict[str, Any] = {"queries": 0, "ticks": 0, "tick_seconds": 0.0, "phase_ms": {}}

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*_: Any) -> None:
        counters["queries"] += 1

    marks: dict[str, Any] = {}
    stop = threading.Event()

    def snapshot(name: str) -> None:
        marks[name] = json.loads(json.dumps(counters))
        marks[name]["cpu_seconds"] = time.process_time()  # all threads of this process: passes + LLM calls
        marks[name]["wall"] = time.monotonic()

    signal.signal(signal.SIGUSR1, lambda *_: snapshot("start"))
    signal.signal(signal.SIGTERM, lambda *_: (snapshot("end"), stop.set()))
    sched = Scheduler(engine=engine, publish=lambda *a, **k: None)
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    print("ready", flush=True)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            for key, val in sched.tick().items():
                if key.startswith("ms_"):
                    counters["phase_ms"][key[3:]] = counters["phase_ms"].get(key[3:], 0) + val
        except Exception as exc:  # noqa: BLE001 - keep measuring; report it
            print("tick failed:", exc, flush=True)
        counters["tick_seconds"] += time.monotonic() - t0
        counters["ticks"] += 1
        stop.wait(sched.settings.scheduler_interval)
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    sched.pool.shutdown(wait=True, cancel_futures=True)
    sched.close()
    Path(stats_path).write_text(json.dumps(marks))


def run(args: argparse.Namespace, admin: str, redis_url: str) -> dict[str, Any]:
    import signal
    import subprocess

    from sqlalchemy import func, select

    from farm.db import dispose_engines, make_engine, session_scope
    from farm.models import DecisionRecord, Experiment
    from farm.programs import create_program
    from farm.settings import reset_settings_cache
    from tests.llm_server import ScriptedLLM

    db_url = fresh_database(admin, "scale")
    tmp = tempfile.TemporaryDirectory(prefix="farm-scale-")
    saved = dict(os.environ)
    os.environ.update(FARM_DATABASE_URL=db_url, FARM_BROKER_URL=redis_url, FARM_HOME=str(Path(tmp.name) / "home"),
                      FARM_HEARTBEAT_INTERVAL="2", FARM_SCHEDULER_INTERVAL="0.2",
                      FARM_LOOKAHEAD=str(args.lookahead), FARM_LLM_CONCURRENCY=str(args.concurrency))
    reset_settings_cache()
    dispose_engines()
    script = [{"content": answer(i), "delay": args.latency} for i in range(100_000)]
    stats_path = Path(tmp.name) / "scheduler-stats.json"
    child: subprocess.Popen[str] | None = None
    try:
        with ScriptedLLM(script) as srv:
            with session_scope() as s:
                create_program(s, name="scale", instructions="# lower val_bpb", time_budget=args.job,
                               proposer={"kind": "llm", "model": "openai/scripted", "api_base": srv.base,
                                         "api_key": "k", "timeout": 30, "max_attempts": 2},
                               policy={"kind": "greedy", "baseline_runs": 2})
            fleet = Fleet(args.workers, args.job, make_engine(db_url, pool_size=args.workers + 2, max_overflow=8))
            fleet.register()
            t0 = time.monotonic()
            child = subprocess.Popen([sys.executable, __file__, "--child-stats", str(stats_path)]
                                     + (["--profile", args.profile] if args.profile else []),
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ))
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the scheduler process did not start: {line!r}")
            print(f"scheduler process ready in {time.monotonic() - t0:.1f} s (litellm import; not measured)")
            threads = fleet.threads()
            for t in threads:
                t.start()
            time.sleep(args.warmup)  # the first proposals, the baselines
            with session_scope() as s:
                d0 = s.scalar(select(func.count()).select_from(DecisionRecord)) or 0
                p0 = s.scalar(select(func.count()).select_from(Experiment)
                              .where(Experiment.proposer_kind == "llm")) or 0
            child.send_signal(signal.SIGUSR1)
            fleet.reset()
            t0 = time.monotonic()
            time.sleep(args.seconds)
            idle, busy, done = fleet.finish()
            samples, starved = list(fleet.samples), fleet.starved
            child.send_signal(signal.SIGTERM)
            wall = time.monotonic() - t0
            with session_scope() as s:
                d1 = s.scalar(select(func.count()).select_from(DecisionRecord)) or 0
                p1 = s.scalar(select(func.count()).select_from(Experiment)
                              .where(Experiment.proposer_kind == "llm")) or 0
            rest = child.communicate(timeout=120)[0]
            if rest.strip():
                print(rest.strip())
            fleet.stop.set()
            for t in threads:
                t.join(30)
            fleet.engine.dispose()
            marks = json.loads(stats_path.read_text())
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        os.environ.clear()
        os.environ.update(saved)
        reset_settings_cache()
        dispose_engines()
        drop_database(admin, db_url)
        tmp.cleanup()
    a, b = marks["start"], marks["end"]
    capacity = args.workers * wall
    decisions = d1 - d0
    ticks = b["ticks"] - a["ticks"]
    phase = {k: v - a["phase_ms"].get(k, 0) for k, v in b["phase_ms"].items()}
    return {"workers": args.workers, "job_seconds": args.job, "llm_latency": args.latency,
            "lookahead": args.lookahead, "llm_concurrency": args.concurrency, "measured_seconds": wall,
            "capacity_worker_seconds": capacity, "idle_worker_seconds": idle, "idle_percent": 100 * idle / capacity,
            "starved_worker_seconds": starved, "starved_percent": 100 * starved / capacity,
            "busy_percent": 100 * busy / capacity, "jobs_done": done, "proposals": p1 - p0,
            "proposals_per_minute": (p1 - p0) / wall * 60, "decisions": decisions,
            "queries": b["queries"] - a["queries"],
            "queries_per_decision": (b["queries"] - a["queries"]) / decisions if decisions else None,
            "ticks": ticks, "mean_tick_seconds": (b["tick_seconds"] - a["tick_seconds"]) / max(1, ticks),
            "phase_ms_total": phase,
            "samples": len(samples),
            "idle_with_empty_queue_percent": 100 * sum(1 for i, q in samples if i and not q) / max(1, len(samples)),
            "idle_with_queued_percent": 100 * sum(1 for i, q in samples if i and q) / max(1, len(samples)),
            "mean_queued": sum(q for _, q in samples) / max(1, len(samples)),
            "scheduler_cpu_percent": 100 * (b["cpu_seconds"] - a["cpu_seconds"]) / (b["wall"] - a["wall"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--job", type=float, default=5.0, help="seconds each simulated job takes")
    ap.add_argument("--latency", type=float, default=2.0, help="seconds before the LLM server answers")
    ap.add_argument("--seconds", type=float, default=90.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring (first proposals)")
    ap.add_argument("--lookahead", type=int, default=64, help="FARM_LOOKAHEAD (queued + in flight beyond the fleet)")
    ap.add_argument("--concurrency", type=int, default=64, help="FARM_LLM_CONCURRENCY")
    ap.add_argument("--profile", help="write a cProfile of the scheduler's passes to this file")
    ap.add_argument("--child-stats", help=argparse.SUPPRESS)  # internal: run as the scheduler process
    args = ap.parse_args()
    if args.child_stats:
        scheduler_child(args.child_stats, args.profile)
        return
    print(f"bench/scheduler_scale.py: {cpu_name()}, {os.cpu_count()} CPUs; {args.workers} simulated workers, "
          f"{args.job:g} s jobs, LLM answers after {args.latency:g} s, lookahead {args.lookahead}, "
          f"LLM concurrency {args.concurrency}, {args.seconds:g} s measured after {args.warmup:g} s warm-up")
    with services() as (admin, redis_url):
        r = run(args, admin, redis_url)
    print(f"idle worker-seconds waiting for a proposal (nothing queued for them): {r['starved_worker_seconds']:.1f} "
          f"of {r['capacity_worker_seconds']:.0f} = {r['starved_percent']:.2f} % of capacity (target < 1 %)")
    print(f"idle worker-seconds in all (also while their claim was on its way): {r['idle_worker_seconds']:.1f} = "
          f"{r['idle_percent']:.2f} %")
    print(f"busy: {r['busy_percent']:.1f} % of capacity, {r['jobs_done']} jobs done")
    print(f"samples ({r['samples']}, twice a second): idle workers and an empty queue "
          f"{r['idle_with_empty_queue_percent']:.0f} %, idle workers beside queued experiments (the fleet's "
          f"claiming lag) {r['idle_with_queued_percent']:.0f} %, mean queued {r['mean_queued']:.1f}")
    print(f"proposals per minute: {r['proposals_per_minute']:.1f} ({r['proposals']} in {r['measured_seconds']:.0f} s)")
    qpd = r["queries_per_decision"]
    print(f"database queries per decision: {qpd:.1f} ({r['queries']} queries, {r['decisions']} decisions)"
          if qpd is not None else "no decisions in the window")
    print(f"scheduler passes: {r['ticks']}, mean {1000 * r['mean_tick_seconds']:.0f} ms each; the scheduler "
          f"process used {r['scheduler_cpu_percent']:.0f} % of one core (passes and LLM client threads)")
    print("time in each phase of the passes (ms, measured window): "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["phase_ms_total"].items(), key=lambda kv: -kv[1])))
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "bench_scheduler_scale.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
