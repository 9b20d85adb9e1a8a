"""The benches bench/gpu_check.sh runs on a borrowed GPU, run here on the CPU (the cpu profile) so that device
time is never spent finding their bugs: bench/kernels.py's whole-template comparison (one train.py per
--configs entry, edits applied to the run's copy, ratios against the first, optional profiles) and
bench/gate_gap.py (runs handed over through the device gate, the gap between their timed windows)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_DATA_DIR=str(tmp_path / "data"), FARM_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


def test_kernels_step_configs_with_edits_and_profiles(tmp_path):
    env = _env(tmp_path, FARM_MAX_STEPS="4", FARM_TIME_BUDGET="1000")
    log, profiles = tmp_path / "train.log", tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, "bench/kernels.py", "--device", "cpu", "--no-ops", "--step", "--eval-tokens", "8192",
         "--configs", "none; none COMPILE_OPTIMIZER=False DEPTH=1 ;none NO_SUCH_LINE=1", "--log", str(log),
         "--torch-profile", str(profiles)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr  # one of the runs failed
    assert "1 of 3 runs failed: none NO_SUCH_LINE=1" in out
    assert "running train.py with FARM_KERNELS=none and COMPILE_OPTIMIZER=False, DEPTH=1 ..." in out
    assert len(re.findall(r"^  cpu \(.*\): tokens/s ", out, re.M)) == 2, out
    assert re.search(r"^none COMPILE_OPTIMIZER=False DEPTH=1 / none: tokens/s x\d+\.\d{3}, .*peak VRAM n/a, val_bpb [+-]\d",
                     out, re.M), out
    assert "FAILED (--set NO_SUCH_LINE=1: no such hyperparameter line in train.py)" in out
    # the edit reached the run: depth 1 in its log, depth 2 (the cpu baseline) in the other's
    text = log.read_text()
    assert "===== none COMPILE_OPTIMIZER=False DEPTH=1 exit 0" in text and "depth 1, dim" in text
    assert "depth 2, dim" in text
    names = sorted(p.name for p in profiles.iterdir())
    assert names == ["none.txt", "none.txt.json", "none_COMPILE_OPTIMIZER=False_DEPTH=1.txt",
                     "none_COMPILE_OPTIMIZER=False_DEPTH=1.txt.json"], names
    assert (profiles / "none.txt").read_text().startswith("torch.profiler over 2 timed step(s) on cpu")


def test_gate_gap_hands_over_on_exit_and_measures_the_gaps(tmp_path):
    out = tmp_path / "gap.json"
    proc = subprocess.run(
        [sys.executable, "bench/gate_gap.py", "--runs", "3", "--slots", "2", "--budget", "2", "--eval-tokens", "8192",
         "--log", str(tmp_path / "gap.log"), "--json", str(out)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    assert [r["exit_code"] for r in rows] == [0, 0, 0] and all(r["training_seconds"] >= 2 for r in rows)
    # run 1 was spawned while run 0 held the device, and timed nothing before run 0 had exited
    assert rows[1]["spawned"] < rows[0]["exited"]
    for a, b in zip(rows, rows[1:], strict=False):
        assert b["training_started_at"] >= a["exited"], (a, b)
    assert len(summary["gaps"]) == 2 and all(g > 0 for g in summary["gaps"])
    assert re.search(r"^projection to the 300 s budget: duty cycle \d+\.\d %", proc.stdout, re.M), proc.stdout


def test_template_bench_scores_one_run_in_process_and_isolated(tmp_path):
    """bench/template.py --isolated: the same capped run evaluated in its own process and by the worker's isolated
    evaluation gives the same val_bpb, and the bench prints what the isolation costs."""
    proc = subprocess.run(
        [sys.executable, "bench/template.py", "--profile", "cpu", "--budget", "1000", "--max-steps", "3",
         "--eval-tokens", "8192", "--isolated", "--cache-dir", str(tmp_path / "cache"),
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"^isolated vs in-process evaluation: val_bpb (\S+) vs (\S+) \(difference \+0\.00e\+00\); the run's "
                  r"wall [\d.]+ s vs [\d.]+ s \([+-][\d.]+ s: export [\d.]+ s \+ a second process [\d.]+ s", proc.stdout,
                  re.M)
    assert m and m.group(1) == m.group(2), proc.stdout
    assert re.search(r"^  export s / evaluator wall s +[\d.]+ / [\d.]+$", proc.stdout, re.M), proc.stdout
