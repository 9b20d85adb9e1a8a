"""What making a candidate's commit durable costs: `Lineage.commit_candidate` (objects written in-process by gitdb,
then the ref) timed with the fsyncs farm/lineage.py does and with them switched off, on a repository in a folder of
this checkout (the disk the farm home would be on). Prints ms per candidate for both and their ratio.

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
        durable = per_candidate_ms(lin, root, args.candidates, args.lines, 1)
        real = lineage._fsync_file
        lineage._fsync_file = lambda path, made=(): None  # type: ignore[assignment]
        try:
            loose = per_candidate_ms(lin, root, args.candidates, args.lines, 100_000)
        finally:
            lineage._fsync_file = real  # type: ignore[assignment]
    out: dict[str, Any] = {"candidates": args.candidates, "ms_per_candidate_fsync": round(durable, 3),
                           "ms_per_candidate_no_fsync": round(loose, 3), "ratio": round(durable / loose, 2)}
    print(f"commit_candidate: {durable:.2f} ms with fsync, {loose:.2f} ms without ({durable / loose:.2f}x), "
          f"{args.candidates} candidates each")
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "bench_lineage.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
