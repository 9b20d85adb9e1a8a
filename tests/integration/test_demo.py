"""`farm demo` end to end with a short budget: the same path as `make demo` (fresh farm home under
the output folder, API + scheduler + a CPU worker, the example program with the mutation
proposer), and the outputs it promises."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.farmproc import FarmProcess, clean_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MINUTES = 2.0  # one CPU worker on a loaded 2-core machine finishes a 5 s run in well under a minute


def test_demo_writes_leaderboard_results_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = clean_env(FARM_API_PORT=str(free_port()))
    demo = FarmProcess(["demo", "--minutes", str(MINUTES), "--budget", "5", "--out", str(out)], env,
                       tmp_path / "demo.log")
    started = time.monotonic()
    try:
        demo.start()
        rc = demo.wait(timeout=MINUTES * 60 + 180)
        wall = time.monotonic() - started
        output = demo.output()
        assert rc == 0, output[-5000:]
    finally:
        demo.kill_tree()
    assert wall < MINUTES * 60 + 90, f"the demo overran its deadline: {wall:.0f}s"
    assert "dashboard: http://127.0.0.1:" in output
    assert "leaderboard" in output
    for name in ("results.tsv", "progress.png", "leaderboard.tsv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing:\n{output[-3000:]}"
    lines = (out / "results.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(lines) >= 2, f"results.tsv has no rows:\n{output[-3000:]}"
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "home" / "farm.db").is_file(), "the demo did not use a fresh home under its output folder"
