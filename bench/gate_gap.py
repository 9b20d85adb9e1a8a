"""Device time between timed runs with job slots, without the farm: N `train.py` runs of training_template/
started as a worker with S slots starts them (each with a turn of worker/gate.py's DeviceGate as FARM_GATE_FD,
the next one spawned while the current one trains), so the figure for one GPU box needs no Postgres, Redis
or Celery. Prints per run start-up, gate wait, training, evaluation, tokens/s and MFU, then the gaps from
one run's last timed step to the next run's first and the duty cycle they project for the 300 s budget.

    python bench/gate_gap.py --runs 3 --slots 2 --budget 20 --corpus synthetic --eval-tokens 4194304

bench/farm.py measures the same gap through the whole farm (scheduler, queue, worker, database) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "training_template"
sys.path.insert(0, str(ROOT))

from worker.gate import DeviceGate, Turn  # noqa: E402  (standard library only)


def _start(i: int, gate: DeviceGate, tmp: Path, env: dict[str, str], log) -> tuple[subprocess.Popen, Turn, Path]:
    turn = gate.turn()
    result = tmp / f"result-{i}.json"
    child_env = dict(env, FARM_RESULT_PATH=str(result), FARM_GATE_FD=str(turn.read_fd))
    log.write(f"===== run {i} spawned at {time.time():.3f}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=TEMPLATE, env=child_env, stdout=log,
                            stderr=subprocess.STDOUT, pass_fds=(turn.read_fd,))
    turn.close_child_end()
    return proc, turn, result


def run(runs: int, slots: int, env: dict[str, str], log_path: Path, timeout: float) -> list[dict[str, Any]]:
    gate = DeviceGate()
    out: list[dict[str, Any]] = [{} for _ in range(runs)]
    with tempfile.TemporaryDirectory(prefix="farm-gate-gap-") as tmp, open(log_path, "a") as log:
        pending, active = list(range(runs)), {}
        deadline = time.monotonic() + timeout
        while pending or active:
            while pending and len(active) < slots:
                i = pending.pop(0)
                active[i] = _start(i, gate, Path(tmp), env, log)
                out[i]["spawned"] = time.time()
            for i, (proc, turn, result) in list(active.items()):
                if time.monotonic() > deadline:
                    proc.kill()
                rc = proc.poll()
                if rc is None:
                    continue
                out[i].update(exit_code=rc, exited=time.time())  # noted before the next turn opens
                turn.done()  # the holder exited: the next turn opens now, as the worker does it
                del active[i]
                if rc == 0 and result.exists():
                    out[i].update(json.loads(result.read_text()))
            time.sleep(0.02)
    return out


def gaps(rows: list[dict[str, Any]]) -> list[float]:
    timed = sorted((r for r in rows if r.get("training_started_at") is not None), key=lambda r: r["training_started_at"])
    return [b["training_started_at"] - (a["training_started_at"] + a["training_seconds"])
            for a, b in zip(timed, timed[1:], strict=False)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--budget", type=float, help="FARM_TIME_BUDGET (default: the profile's)")
    ap.add_argument("--eval-tokens", type=int, help="FARM_EVAL_TOKENS (default: the profile's)")
    ap.add_argument("--corpus", help="FARM_CORPUS (default: the environment's, else bible)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for all runs together")
    ap.add_argument("--log", default="artifacts/gate_gap.log", help="the runs' output")
    ap.add_argument("--json", default="artifacts/bench_gate_gap.json")
    args = ap.parse_args()
    if args.runs < 2 or args.slots < 1:
        ap.error("--runs must be at least 2 and --slots at least 1")
    env = {k: v for k, v in os.environ.items() if k not in ("FARM_RESULT_PATH", "FARM_GATE_FD", "FARM_NONCE_FD")}
    env["PYTHONUNBUFFERED"] = "1"
    for value, var in ((args.budget, "FARM_TIME_BUDGET"), (args.eval_tokens, "FARM_EVAL_TOKENS"),
                       (args.corpus, "FARM_CORPUS")):
        if value is not None:
            env[var] = str(value)
    for path in (args.log, args.json):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = run(args.runs, args.slots, env, Path(args.log), args.timeout)
    wall = time.time() - t0
    print(f"{args.runs} runs, {args.slots} slot(s), wall {wall:.1f} s, log {args.log}")
    cols = ("startup_seconds", "gate_wait_seconds", "eval_warmup_seconds", "training_seconds", "eval_seconds")
    print(f"{'run':>3} {'exit':>4} " + " ".join(f"{c.replace('_seconds', ''):>12}" for c in cols)
          + f" {'tokens/s':>12} {'MFU %':>6} {'val_bpb':>9} {'steps':>6}")
    for i, r in enumerate(rows):
        if "val_bpb" not in r:
            print(f"{i:>3} {r.get('exit_code', '-'):>4}  failed: see {args.log}")
            continue
        cells = " ".join(f"{float(r.get(c) or 0.0):12.2f}" for c in cols)
        print(f"{i:>3} {r['exit_code']:>4} {cells} {r['tokens_per_second']:12,.0f} {r['mfu_percent']:6.2f} "
              f"{r['val_bpb']:9.5f} {r['num_steps']:6d}")
    found = gaps(rows)
    summary: dict[str, Any] = {"runs": args.runs, "slots": args.slots, "budget": args.budget, "wall_seconds": wall,
                               "gaps": found, "rows": rows}
    if found:
        gap = statistics.fmean(found)
        summary.update(gap_mean=gap, duty_cycle_300=300.0 / (300.0 + gap))
        print(f"device time from one run's last timed step to the next's first: mean {gap:.2f} s "
              f"({', '.join(f'{g:.2f}' for g in found)})")
        print(f"projection to the 300 s budget: duty cycle {100 * 300.0 / (300.0 + gap):.1f} %, "
              f"{3600.0 / (300.0 + gap):.2f} runs per device-hour")
    Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    failed = sum(1 for r in rows if "val_bpb" not in r)
    if failed:
        print(f"{failed} run(s) failed")
    return 1 if failed or not found else 0


if __name__ == "__main__":
    sys.exit(main())
