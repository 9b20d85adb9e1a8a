"""Which crashes are worth a repair proposal (AIDE-style debug attempts with the traceback).

A Python error raised by the candidate's own code (NameError, shape mismatch, typo) is usually
fixable by looking at the traceback. Running out of memory, a diverging loss, a timeout or a
refused harness is a property of the idea or the machine, not a bug: no repair.
"""

from __future__ import annotations

import re

_FIXABLE = re.compile(r"Traceback \(most recent call last\)|\b\w+Error\b|\bException\b")
_NOT_FIXABLE = re.compile(r"out of memory|OutOfMemoryError|\bKilled\b|MemoryError|timed? ?out|\bFAIL\b|\bnan\b"
                          r"|loss exploded|harness|tamper|SIGKILL", re.I)


def looks_fixable(log_tail: str | None, reason: str | None = None) -> bool:
    text = f"{reason or ''}\n{log_tail or ''}"
    if not text.strip() or _NOT_FIXABLE.search(text):
        return False
    return bool(_FIXABLE.search(text))


def repair_depth(chain: dict[int, int | None], experiment_id: int) -> int:
    """How many repairs lead to this experiment (0 for an original); `chain` maps id -> repair_of."""
    depth, seen, cur = 0, set(), chain.get(experiment_id)
    while cur is not None and cur not in seen:
        seen.add(cur)
        depth += 1
        cur = chain.get(cur)
    return depth
