"""Read progress (percent of the budget) and the current loss from the child's output lines.

The template prints one line per step in the reference's style, e.g.
    step    42 | loss 3.4568 | lrm 1.00 | progress 0.140 | 12,345 tok/s          (training_template/train.py)
    step 00042 (14.0%) | loss: 3.456789 | lrm: 1.00 | dt: 512ms | mfu: 1.2% | ...   (the reference)
(with `\r` endings, so the runner splits on both). The parser is deliberately tolerant: any line
with `step N`, a parenthesised percentage or `progress: x` and `loss: x` is understood, and one
it cannot read changes nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_PCT = re.compile(r"\(\s*(\d+(?:\.\d+)?)\s*%\s*\)")
_PROGRESS = re.compile(r"\bprogress\s*[:=]?\s*(\d+(?:\.\d+)?)(\s*%)?", re.IGNORECASE)
_LOSS = re.compile(r"\b(?:train_)?loss\s*[:=]?\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", re.IGNORECASE)
_STEP = re.compile(r"^\s*step\s*[:=]?\s*(\d+)", re.IGNORECASE)


@dataclass
class Progress:
    percent: float | None = None
    loss: float | None = None
    step: int | None = None
    changed: bool = False

    def feed(self, line: str) -> None:
        """Update from one output line (never raises)."""
        if "loss" not in line.lower() and "progress" not in line.lower():
            return
        m = _STEP.search(line)
        if m:
            self.step = int(m.group(1))
        pct = None
        m = _PCT.search(line)
        if m:
            pct = float(m.group(1))
        else:
            m = _PROGRESS.search(line)
            if m:
                value = float(m.group(1))
                pct = value if m.group(2) or value > 1.0 else value * 100.0
        if pct is not None and 0.0 <= pct <= 100.0:
            self.percent, self.changed = round(pct, 3), True
        m = _LOSS.search(line)
        if m:
            loss = float(m.group(1))
            if math.isfinite(loss):
                self.loss, self.changed = loss, True
