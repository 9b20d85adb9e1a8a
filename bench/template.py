"""Benchmark the training template: run `python train.py` for a profile and budget, then print throughput
(tokens/s), MFU (reference formula, H100 bf16 peak 989.5 TFLOPS), peak VRAM, startup / training / eval
seconds and val_bpb. Prints figures; asserts nothing about speed.

    python bench/template.py                         # h100 profile on CUDA, cpu profile otherwise
    python bench/template.py --profile cpu --budget 20
    python bench/template.py --synthetic             # random-token stream: throughput without corpus prep
    python bench/template.py --baseline-kernels      # same run with KERNEL_OPS = "none" for comparison
    python bench/template.py --isolated --max-steps 20   # same run scored in-process and by the worker's isolated
                                                     # evaluation (export + `prepare.py --evaluate`): cost, val_bpb

Data and tokenizer caches go to a temporary folder unless --data-dir / --cache-dir name one (keep them
between runs to leave tokenizer training out of the startup figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "training_template"


def default_profile() -> str:
    try:
        import torch
        return "h100" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_once(args: argparse.Namespace, workdir: Path, use_kernels: bool, isolated: bool = False) -> dict:
    template = TEMPLATE
    if not use_kernels:  # a patched copy, exactly as a candidate would edit the constant
        template = workdir / "template-nokernels"
        shutil.copytree(TEMPLATE, template, ignore=shutil.ignore_patterns("__pycache__", "result.json"),
                        dirs_exist_ok=True)
        train = template / "train.py"
        train.write_text(re.sub(r'^KERNEL_OPS = "[^"]*"', 'KERNEL_OPS = "none"', train.read_text(), flags=re.M))
    result_path = workdir / f"result-{'kernels' if use_kernels else 'reference'}{'-isolated' if isolated else ''}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_PROFILE=args.profile, FARM_SEED=str(args.seed), FARM_RESULT_PATH=str(result_path),
               FARM_DATA_DIR=str(args.data_dir or workdir / "data"),
               FARM_CACHE_DIR=str(args.cache_dir or workdir / "cache"))
    if args.budget is not None:
        env["FARM_TIME_BUDGET"] = str(args.budget)
    if args.eval_tokens is not None:
        env["FARM_EVAL_TOKENS"] = str(args.eval_tokens)
    export = workdir / "export" / "model.json"
    if isolated:  # as the worker runs it (worker/runner.py), without the sandbox
        env["FARM_EVAL_EXPORT"] = str(export)
    if args.max_steps is not None:
        env["FARM_MAX_STEPS"] = str(args.max_steps)
    if args.synthetic:
        env["FARM_CORPUS"] = "synthetic"
    elif args.corpus:
        env["FARM_CORPUS"] = args.corpus
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py"], cwd=template, env=env, text=True,
                          stdout=None if args.verbose else subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stdout or "")[-3000:]
        raise SystemExit(f"train.py exited {proc.returncode}\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    if isolated:
        eval_path = workdir / "eval.json"
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(TEMPLATE / "prepare.py"), "--evaluate", str(export)],
                              cwd=export.parent, env=dict(env, FARM_RESULT_PATH=str(eval_path)), text=True,
                              stdout=None if args.verbose else subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not eval_path.exists():
            raise SystemExit(f"prepare.py --evaluate exited {proc.returncode}\n{(proc.stdout or '')[-3000:]}")
        scores = json.loads(eval_path.read_text())
        result.update({k: scores[k] for k in ("val_bpb", "test_bpb", "eval_seconds", "eval_tokens")})
        result["evaluator_wall_seconds"] = time.time() - t0
        result["export_bytes"] = export.stat().st_size + Path(f"{export}.tensors").stat().st_size
        result["wall_seconds"] += result["evaluator_wall_seconds"]
    return result


def report(label: str, r: dict) -> None:
    print(f"== {label}: profile {r['profile']}, corpus {r['corpus']}, device {r['device']}, torch {r['torch_version']}")
    rows = [
        ("tokens/s (timed steps)", f"{r['tokens_per_second']:,.0f}"),
        ("MFU % (H100 peak)", f"{r['mfu_percent']:.2f}"),
        ("peak VRAM MB", f"{r['peak_vram_mb']:,.1f}"),
        ("startup s (incl. compile)", f"{r['startup_seconds']:.1f}"),
        ("training s", f"{r['training_seconds']:.1f}"),
        ("eval s (val + test)", f"{r['eval_seconds']:.1f}"),
        *([("export s / evaluator wall s", f"{r['export_seconds']:.1f} / {r['evaluator_wall_seconds']:.1f}"),
           ("export MB", f"{r['export_bytes'] / 2**20:.1f}")] if "export_seconds" in r else []),
        ("total s (harness) / wall s", f"{r['total_seconds']:.1f} / {r['wall_seconds']:.1f}"),
        ("steps / tokens M", f"{r['num_steps']} / {r['total_tokens_m']:.1f}"),
        ("params M / depth", f"{r['num_params_m']:.1f} / {r['depth']}"),
        ("val_bpb / test_bpb", f"{r['val_bpb']:.6f} / {r['test_bpb']:.6f}"),
    ]
    for name, value in rows:
        print(f"  {name:<28}{value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="h100 | cpu (default: h100 with CUDA, else cpu)")
    parser.add_argument("--budget", type=float, default=None, help="training seconds (default: the profile's)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--synthetic", action="store_true", help="random-token corpus, no tokenizer training")
    parser.add_argument("--corpus", default=None, help="bible | climbmix | FOLDER (ignored with --synthetic)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--baseline-kernels", action="store_true", help='also run with KERNEL_OPS = "none"')
    parser.add_argument("--isolated", action="store_true",
                        help="also score the same run by the isolated evaluation (export + prepare.py --evaluate)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="FARM_EVAL_TOKENS (default: the profile's)")
    parser.add_argument("--json", action="store_true", help="print the result JSON(s) too")
    parser.add_argument("--verbose", action="store_true", help="show train.py's output")
    args = parser.parse_args()
    args.profile = args.profile or default_profile()
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        results = {"kernels": run_once(args, Path(tmp), use_kernels=True)}
        if args.baseline_kernels:
            results["reference"] = run_once(args, Path(tmp), use_kernels=False)
        if args.isolated:
            results["isolated"] = run_once(args, Path(tmp), use_kernels=True, isolated=True)
    for label, r in results.items():
        report(label, r)
        if args.json:
            print(json.dumps(r, indent=1, sort_keys=True))
    if "reference" in results and results["reference"]["tokens_per_second"]:
        ratio = results["kernels"]["tokens_per_second"] / results["reference"]["tokens_per_second"]
        print(f"kernels vs references: {ratio:.3f}x tokens/s")
    if "isolated" in results:
        a, b = results["kernels"], results["isolated"]
        print(f"isolated vs in-process evaluation: val_bpb {b['val_bpb']:.6f} vs {a['val_bpb']:.6f} "
              f"(difference {b['val_bpb'] - a['val_bpb']:+.2e}); the run's wall {b['wall_seconds']:.1f} s vs "
              f"{a['wall_seconds']:.1f} s ({b['wall_seconds'] - a['wall_seconds']:+.1f} s: export "
              f"{b['export_seconds']:.1f} s + a second process {b['evaluator_wall_seconds']:.1f} s, minus the "
              f"in-process evaluation {a['eval_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
