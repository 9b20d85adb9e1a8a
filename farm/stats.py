"""Noise statistics of a program's runs: the one place the farm computes them.

The seed-to-seed noise of val_bpb (about 0.002 on the reference setup) decides whether an
improvement is real. It is estimated from replicates: runs of the same commit (baseline re-runs
of a head, confirmation runs of a candidate) form a group, and the groups are pooled:

    sigma^2 = sum over groups of sum (x - mean_g)^2  /  sum over groups of (n_g - 1)

Pooling keeps a head that moved (and so a mean that moved) from inflating the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from farm.models import DecisionRecord, Experiment, ExperimentRole, ExperimentStatus, Program, Result

SIGMA_KEYS = ("sigma", "noise_sigma")  # where a decision's statistics may carry the policy's estimate


@dataclass(frozen=True)
class Noise:
    sigma: float | None  # None until at least one group has two runs
    dof: int  # degrees of freedom behind the estimate (sum of n_g - 1)
    source: str  # "decisions" (the policy's own figure), "replicates" or "none"


def pooled_sigma(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """Pooled standard deviation over groups of replicates, and its degrees of freedom."""
    ss, dof = 0.0, 0
    for g in groups:
        if len(g) < 2:
            continue
        mean = sum(g) / len(g)
        ss += sum((x - mean) ** 2 for x in g)
        dof += len(g) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def pooled_from_moments(rows: Iterable[tuple[int, float, float]]) -> tuple[float | None, int]:
    """The same estimate from per-group (n, sum x, sum x^2), as a GROUP BY returns them.

    Values near 1.0 with spreads near 1e-3: the cancellation in sum x^2 - (sum x)^2 / n loses about
    1e-16 x n relative precision, far below the spreads that matter.
    """
    ss, dof = 0.0, 0
    for n, sx, sxx in rows:
        if n < 2:
            continue
        ss += max(0.0, float(sxx) - float(sx) ** 2 / n)
        dof += n - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def sigma_from_statistics(statistics: dict[str, Any] | None) -> float | None:
    for key in SIGMA_KEYS:
        value = (statistics or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
            return float(value)
    return None


def run_commit() -> Any:
    """The commit a run trained: its own commit, or its parent's for a baseline re-run of the head."""
    return func.coalesce(Experiment.commit_sha, Experiment.parent_commit)


NOISE_LOOKBACK = 200  # decisions read back for the latest sigma; past that, the replicates are pooled again


def program_noise(session: Session, program_id: int) -> Noise:
    """The sigma of the policy's latest decision that used one; otherwise pooled over replicate groups. Some
    decisions use none (a parent with no successful run, a run on another hardware class): the one before them still
    holds (found by review: the card fell back to the raw pooled figure after such a decision)."""
    recent = session.execute(
        select(DecisionRecord.statistics).where(DecisionRecord.program_id == program_id)
        .order_by(DecisionRecord.id.desc()).limit(NOISE_LOOKBACK)
    ).scalars()
    for stats in recent:
        sigma = sigma_from_statistics(stats)
        if sigma is not None:
            dof = stats.get("dof") if isinstance(stats, dict) else None
            return Noise(sigma=sigma, dof=int(dof) if isinstance(dof, int) else 0, source="decisions")
    # only commits that were deliberately re-run (a baseline or a confirmation) can form a group:
    # looking them up first keeps this an index walk instead of a pass over every run
    keys = (select(run_commit()).where(Experiment.program_id == program_id,
                                       Experiment.role.in_((ExperimentRole.baseline, ExperimentRole.confirmation)))
            .scalar_subquery())
    rows = session.execute(
        select(func.count(Result.val_bpb), func.sum(Result.val_bpb), func.sum(Result.val_bpb * Result.val_bpb))
        .join(Experiment, Experiment.id == Result.experiment_id)
        .where(Experiment.program_id == program_id, Experiment.status == ExperimentStatus.succeeded,
               Result.val_bpb.is_not(None),
               Experiment.commit_sha.in_(keys) | (Experiment.commit_sha.is_(None) & Experiment.parent_commit.in_(keys)))
        .group_by(run_commit())
        .having(func.count(Result.val_bpb) > 1)
    ).all()
    sigma, dof = pooled_from_moments((int(n), float(sx or 0.0), float(sxx or 0.0)) for n, sx, sxx in rows)
    return Noise(sigma=sigma, dof=dof, source="replicates" if sigma is not None else "none")


def baseline_val_bpb(session: Session, program_id: int) -> float | None:
    """Mean val_bpb of the baseline runs of the program's first measured commit (where it started)."""
    return baseline_val_bpbs(session, [program_id]).get(program_id)


def baseline_val_bpbs(session: Session, program_ids: Sequence[int] | None = None) -> dict[int, float]:
    """baseline_val_bpb of many programs (all of them for None) in one statement; programs without one are
    left out. The program list asked for it once per program (35 statements for 31 programs, every 2 s).

    Both lookups are correlated per program, so each is a walk of the (program_id, role) index: joined
    and grouped instead, SQLite drove the query from every succeeded run (47 ms at 100k runs; this, 8 ms).
    """
    def baselines(e: Any) -> tuple[Any, ...]:
        return (e.program_id == Program.id, e.role == ExperimentRole.baseline,
                e.status == ExperimentStatus.succeeded)

    first = aliased(Experiment)
    start = (select(func.coalesce(first.commit_sha, first.parent_commit)).where(*baselines(first))
             .order_by(first.id).limit(1).correlate(Program).scalar_subquery())
    mean = (select(func.avg(Result.val_bpb)).join(Experiment, Experiment.id == Result.experiment_id)
            .where(*baselines(Experiment), run_commit() == start).correlate(Program).scalar_subquery())
    stmt = select(Program.id, mean)
    if program_ids is not None:
        stmt = stmt.where(Program.id.in_(list(program_ids)))
    return {int(pid): float(v) for pid, v in session.execute(stmt) if v is not None}
