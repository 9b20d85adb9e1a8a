"""What making a candidate's commit durable costs: `Lineage.commit_candidate` (objects written in-process by gitdb,
then the ref) timed with the fsyncs farm/lineage.py does and with them switched off, on a repository in a folder of
this checkout (the disk the farm home would be on), after a warm-up, in alternating blocks. Prints ms per candidate
for both and their ratio.

    python bench/lineage.py [--candidates 300] [--lines 400]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import farm.lineage as lineage  # noqa: E402


def per_candidate_ms(lin: lineage.Lineage, root: str, n: int, lines: int, first_id: int) -> float:
    body = "x = 1\n" * lines
    t0 = time.perf_counter()
    for i in range(n):
        lin.commit_candidate("bench", first_id + i, {"train.py": f"x = {first_id + i}\n" + body}, parent=root,
                             message=f"candidate {first_id + i}\n")
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=300, help="commits timed each way")
    ap.add_argument("--lines", type=int, default=400, help="lines of the candidate's train.py")
    args = ap.parse_args()
    (ROOT / ".build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".build", prefix="bench-lineage-") as tmp:
        lin = lineage.Lineage(Path(tmp) / "repo")
        root = lin.create_root("bench", {"train.py": "x = 1\n" * args.lines, "prepare.py": "fixed\n"},
                               message="template\n")
        real = lineage._fsync_file

        def timed(fsync: bool, first_id: int, n: int) -> float:
            lineage._fsync_file = real if fsync else (lambda path, made=(): None)  # type: ignore[assignment]
            try:
                return per_candidate_ms(lin, root, n, args.lines, first_id)
            finally:
                lineage._fsync_file = real  # type: ignore[assignment]

        timed(False, 1_000_000, 300)  # warm-up: the 256 fan-out folders exist before either is timed
        # the two modes alternate in blocks, so neither gets the quieter half of the run
        blocks, size = 6, max(1, args.candidates // 6)
        with_fsync, without = [], []
        for b in range(blocks):
            with_fsync.append(timed(True, 1 + 2 * b * size, size))
            without.append(timed(False, 1 + (2 * b + 1) * size, size))
        durable, loose = sum(with_fsync) / blocks, sum(without) / blocks
    out: dict[str, Any] = {"candidates": args.candidates, "ms_per_candidate_fsync": round(durable, 3),
                           "ms_per_candidate_no_fsync": round(loose, 3), "ratio": round(durable / loose, 2)}
    print(f"commit_candidate: {durable:.2f} ms with fsync, {loose:.2f} ms without ({durable / loose:.2f}x), "
          f"{args.candidates} candidates each")
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "bench_lineage.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
