"""Latency of the API's two hottest reads with a big program: `GET /programs/{id}` and the first
page of `GET /programs/{id}/experiments`, measured from a second process over real HTTP.

    python bench/api.py --db postgresql+psycopg://farm@127.0.0.1:5432/bench [--experiments 10000]

Seeds the database (fresh: it must be empty and migrated, or pass --migrate), starts `farm api`'s
app with uvicorn in a subprocess, then runs the load generator here and prints p50/p99 per
endpoint. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIFF = "--- a/train.py\n+++ b/train.py\n@@ -10,7 +10,7 @@\n-LR = 0.04\n+LR = 0.03\n"
TRAIN = "# train.py\n" + "x = 1\n" * 400  # a realistic-size files column to make sure lists skip it
IDEAS = ["halve the batch", "raise matrix LR", "warmdown 60%", "GELU instead of relu^2", "depth 10",
         "softcap 20", "value-embed every layer", "QK-norm off", "window SSLL", "AdamW beta2 0.99",
         "muon momentum 0.9", "init scale 0.8", "rope base 50k", "longer warmup", "wd 0.05"]


def seed(db_url: str, n: int, *, name: str = "bench", workers: int = 8, seed_: int = 0) -> int:
    """Insert one program with n finished/running/queued experiments like a long real run. Returns its id."""
    from sqlalchemy import insert

    from farm.db import make_engine, session_scope
    from farm.models import (
        Decision,
        DecisionRecord,
        Experiment,
        ExperimentRole,
        ExperimentStatus,
        LLMCall,
        Program,
        Result,
        Worker,
    )

    rng = random.Random(seed_)
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        prog = Program(name=name, slug=name, instructions="# Lower val_bpb\nTry optimizer and schedule ideas.\n",
                       time_budget=300.0, profile="h100", hw_class="gpu.h100", branch=f"research/{name}",
                       policy={"kind": "confirm", "k_sigma": 2.0}, head_commit=f"{0:040x}", root_commit=f"{0:040x}")
        s.add(prog)
        s.flush()
        pid = prog.id
        for w in range(workers):
            s.add(Worker(id=f"gpu-box-{w // 8}:gpu{w % 8}", host=f"gpu-box-{w // 8}", gpu_index=w % 8,
                         gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_mb=81559, hw_class="gpu.h100"))
    head, best, exps, results, decisions = f"{0:040x}", 0.9979, [], [], []
    for i in range(1, n + 1):
        sha = f"{i:040x}"
        if i <= 3:
            role, status, val, dec = ExperimentRole.baseline, ExperimentStatus.succeeded, 0.9979 + rng.gauss(0, 0.002), None
            sha = f"{0:040x}"
        elif i > n - workers:
            role, status, val, dec = ExperimentRole.candidate, ExperimentStatus.running, None, None
        elif i > n - workers - 20:
            role, status, val, dec = ExperimentRole.candidate, ExperimentStatus.queued, None, None
        elif rng.random() < 0.03:
            role, status, val, dec = ExperimentRole.candidate, ExperimentStatus.crashed, None, None
        elif rng.random() < 0.05:
            role, status, val, dec = ExperimentRole.candidate, ExperimentStatus.invalid, None, None
        else:
            val = best + rng.gauss(0.004, 0.004)
            keep = val < best - 0.002
            role, status, dec = ExperimentRole.candidate, ExperimentStatus.succeeded, Decision.keep if keep else Decision.discard
        finished = status in (ExperimentStatus.succeeded, ExperimentStatus.crashed, ExperimentStatus.invalid)
        exps.append(dict(id=i + 10_000 * (pid - 1), program_id=pid, role=role, parent_commit=head, commit_sha=sha,
                         files={"train.py": TRAIN}, diff=DIFF, proposer_kind="llm", hw_class="gpu.h100",
                         description=f"{rng.choice(IDEAS)} (v{i})", status=status, decision=dec, seed=i,
                         progress=rng.uniform(5, 95) if status == ExperimentStatus.running else None,
                         status_reason="CUDA out of memory" if status == ExperimentStatus.crashed else None))
        if val is not None:
            results.append(dict(experiment_id=exps[-1]["id"], outcome=status, val_bpb=val, test_bpb=val + 0.01,
                                peak_vram_mb=45060.0, training_seconds=300.1, total_seconds=325.9,
                                log_tail=f"step 953 | loss 3.01\n---\nval_bpb: {val:.6f}\n", timings={}))
        elif status == ExperimentStatus.crashed:
            results.append(dict(experiment_id=exps[-1]["id"], outcome=status, exit_code=1, reason="OOM",
                                log_tail="RuntimeError: CUDA out of memory\n", timings={}))
        if dec is not None:
            decisions.append(dict(program_id=pid, experiment_id=exps[-1]["id"], decision=dec, policy="confirm",
                                  reason="bench", head_before=head, head_after=sha if dec == Decision.keep else head,
                                  statistics={"sigma": 0.002, "delta": val - best}))
            if dec == Decision.keep:
                head, best = sha, val
        exps[-1]["_finished"] = finished
    with session_scope(engine) as s:
        from sqlalchemy import text

        from farm.models import utcnow
        for e in exps:
            e.pop("_finished")
        for chunk in range(0, len(exps), 1000):
            s.execute(insert(Experiment), exps[chunk:chunk + 1000])
        for chunk in range(0, len(results), 1000):
            s.execute(insert(Result), results[chunk:chunk + 1000])
        for chunk in range(0, len(decisions), 1000):
            s.execute(insert(DecisionRecord), decisions[chunk:chunk + 1000])
        s.execute(insert(LLMCall), [dict(program_id=pid, model="openai/gpt-4o-mini", cost_usd=0.003,
                                         prompt_tokens=3000, completion_tokens=400) for _ in range(200)])
        from sqlalchemy import update
        # spread the history as a 16-GPU farm makes it (about 90 runs an hour), newest now
        s.execute(text("UPDATE experiments SET finished_at = clock_timestamp() - (:n - id) * interval '40 seconds', "
                       "started_at = clock_timestamp() - (:n - id) * interval '40 seconds' - interval '320 seconds', "
                       "queued_at = clock_timestamp() - (:n - id) * interval '40 seconds' - interval '330 seconds' "
                       "WHERE program_id = :pid AND status IN ('succeeded', 'crashed', 'invalid')"),
                  {"n": max(e["id"] for e in exps), "pid": pid})
        s.execute(update(Experiment).where(Experiment.program_id == pid, Experiment.status == "running")
                  .values(started_at=utcnow(), heartbeat_at=utcnow()))
        running = [e["id"] for e in exps if e["status"] == ExperimentStatus.running]
        for w, eid in zip(sorted(r[0] for r in s.execute(text("SELECT id FROM workers"))), running, strict=False):
            s.execute(update(Worker).where(Worker.id == w).values(current_experiment_id=eid))
            s.execute(update(Experiment).where(Experiment.id == eid).values(worker_id=w))
        if engine.dialect.name == "postgresql":
            s.execute(text("SELECT setval(pg_get_serial_sequence('experiments', 'id'), "
                           "(SELECT max(id) FROM experiments))"))
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    engine.dispose()
    return pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="database URL (empty and migrated, or with --migrate)")
    ap.add_argument("--migrate", action="store_true")
    ap.add_argument("--experiments", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=400, help="per endpoint")
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()

    import httpx

    from farm import migrate
    from farm.db import make_engine, session_scope
    from farm.tokens import create_token

    if args.migrate:
        migrate.upgrade(args.db)
    t0 = time.perf_counter()
    pid = seed(args.db, args.experiments)
    print(f"seeded {args.experiments} experiments in {time.perf_counter() - t0:.1f}s")
    engine = make_engine(args.db)
    with session_scope(engine) as s:
        token = create_token(s, name=f"bench-{os.getpid()}").plain
    engine.dispose()
    port = _free_port()
    env = {**os.environ, "FARM_DATABASE_URL": args.db, "FARM_ENV": "development",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host",
                               "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
                              env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            for _ in range(200):
                try:
                    if c.get("/healthz").status_code in (200, 503):
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            targets = {f"GET /programs/{pid}": f"/programs/{pid}",
                       f"GET /programs/{pid}/experiments (first page)": f"/programs/{pid}/experiments"}
            for label, path in targets.items():
                for _ in range(30):  # warm-up: connection pool, plan cache
                    assert c.get(path).status_code == 200

                def one(path: str = path) -> float:
                    t = time.perf_counter()
                    r = c.get(path)
                    r.raise_for_status()
                    return (time.perf_counter() - t) * 1000

                with ThreadPoolExecutor(args.concurrency) as pool:
                    t = time.perf_counter()
                    lat = list(pool.map(lambda _: one(), range(args.requests)))
                    wall = time.perf_counter() - t
                print(f"{label}: n={len(lat)} concurrency={args.concurrency} p50={statistics.median(lat):.1f} ms "
                      f"p99={_pct(lat, 0.99):.1f} ms max={max(lat):.1f} ms ({len(lat) / wall:.0f} req/s)")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
