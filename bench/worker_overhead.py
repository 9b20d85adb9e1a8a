"""The farm's own overhead per experiment: from claim to result written, minus the training process.

Runs N trivial candidates (the fake harness's finish() at once) through the worker's real code path
(claim, load, materialise, sandboxed spawn, heartbeat, judge, record) in this process, and prints
the figures. Embedded SQLite in a temporary farm home unless FARM_DATABASE_URL is set.

    python bench/worker_overhead.py [N]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CANDIDATE = "import prepare\nprepare.finish(1.0, steps=1)\n"


def main(n: int) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="farm-bench-")
    os.environ.setdefault("FARM_HOME", str(Path(tmp.name) / "home"))
    os.environ["FARM_TEMPLATE_DIR"] = str(ROOT / "tests" / "fake_template")
    os.environ.setdefault("FARM_HEARTBEAT_INTERVAL", "1")
    from farm import migrate
    from farm.db import session_scope
    from farm.models import Experiment, ExperimentStatus, Program
    from farm.settings import get_settings, mask_url
    from worker import lifecycle, runner

    settings = get_settings()
    migrate.upgrade(settings.db_url)
    ctx = lifecycle.start(settings, prepare=False, reaper=False)
    with session_scope() as s:
        prog = Program(name="bench", slug=f"bench-{os.getpid()}", instructions="", time_budget=1.0,
                       branch="bench", profile="cpu", hw_class="cpu")
        s.add(prog)
        s.flush()
        ids = []
        for i in range(n + 2):
            e = Experiment(program_id=prog.id, parent_commit="0" * 40, proposer_kind="manual", hw_class="cpu",
                           status=ExperimentStatus.queued, files={"train.py": CANDIDATE}, content_hash=f"b{i}-{os.getpid()}")
            s.add(e)
            s.flush()
            ids.append(e.id)
    rows: list[dict[str, float]] = []
    for i, exp_id in enumerate(ids):
        t0 = time.perf_counter()
        report = runner.run_experiment(exp_id, ctx)
        total = time.perf_counter() - t0
        assert report.status == "succeeded", report
        t = report.timings
        if i < 2:  # warm-up: first ORM compiles, first bwrap
            continue
        rows.append({"total": total, "child": t["child_seconds"], "overhead": total - t["child_seconds"],
                     "claim": t["claim_seconds"], "setup": t["setup_seconds"], "judge": t["judge_seconds"],
                     "report": total - t["overhead_seconds"] - t["child_seconds"]})

    def fmt(key: str) -> str:
        values = sorted(r[key] for r in rows)
        return (f"{key:>9}: median {statistics.median(values) * 1000:7.1f} ms   "
                f"p90 {values[int(0.9 * (len(values) - 1))] * 1000:7.1f} ms")

    print(f"worker overhead, {len(rows)} runs, database {mask_url(settings.db_url)}, sandbox {ctx.sandbox.method}, "
          f"{os.cpu_count()} CPUs")
    for key in ("overhead", "claim", "setup", "judge", "report", "child", "total"):
        print(fmt(key))
    print("overhead = claim -> result committed, minus the training process's wall time (child, which "
          "includes sandbox start-up and the interpreter start)")
    tmp.cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
