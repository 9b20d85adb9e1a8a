"""A program's results in autoresearch's own shapes: results.tsv and the progress plot.

results.tsv (tab-separated, header `commit	val_bpb	memory_gb	status	description`) has one row per
run that reached a verdict, in the order runs finished:
- a decided run: its decision (keep / discard);
- a run that crashed, timed out, was refused or lost: `crash`, val_bpb 0.000000, memory 0.0;
- the program's first baseline run: `keep` (it is where the branch starts, as in autoresearch).
Runs still pending a decision, later baseline re-runs and invalid proposals (never ran) are left out.

The plot: val_bpb of every measured run by run number, kept runs joined as the running best.
Rendered with matplotlib's Agg/SVG backends through Figure objects (no pyplot state: thread-safe).
Kept runs are always drawn exactly; past DRAW_LIMIT discarded runs (or crashes) they are thinned to
what a pixel column can show (see thin_points). `chart_version` names what the plot depends on, so a
server can cache one render per version.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.db import as_utc
from farm.models import Decision, Experiment, ExperimentRole, ExperimentStatus, Program, Result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
CRASH_STATUSES = (ExperimentStatus.crashed, ExperimentStatus.timed_out, ExperimentStatus.refused,
                  ExperimentStatus.lost)
PLOTTED_STATUSES = (ExperimentStatus.succeeded, *CRASH_STATUSES)
# Above this many discarded runs (or crashes) the plot draws a thinned set. At 100k runs drawing every
# point made a 9.9 MB SVG in 2.9 s; 800 columns (about one per pixel of the axes) with at most three
# points each keep the spread and, exactly, the lowest discarded value of every column.
DRAW_LIMIT = 3000
THIN_COLUMNS = 800


@dataclass(frozen=True)
class Row:
    experiment_id: int
    commit: str
    val_bpb: float
    memory_gb: float
    status: str  # keep | discard | crash
    description: str


def result_rows(session: Session, program: Program) -> list[Row]:
    stmt = (
        select(Experiment.id, Experiment.commit_sha, Experiment.parent_commit, Experiment.role,
               Experiment.status, Experiment.decision, Experiment.description, Result.val_bpb,
               Result.peak_vram_mb, Experiment.set_aside)
        .outerjoin(Result, Result.experiment_id == Experiment.id)
        .where(Experiment.program_id == program.id,
               Experiment.status.in_(PLOTTED_STATUSES))
        .order_by(Experiment.finished_at.asc().nulls_last(), Experiment.id)
    )
    rows: list[Row] = []
    first_baseline_seen = False
    for (eid, commit, parent, role, status, decision, description, val_bpb, vram, aside) in session.execute(stmt):
        sha = (commit or parent or "").strip()[:7] or "-------"
        desc = " ".join((description or "").split()) or "(no description)"
        if status in CRASH_STATUSES:
            rows.append(Row(eid, sha, 0.0, 0.0, "crash", desc))
            continue
        if decision is not None:  # a run its change's decision set aside was no measurement of a keep
            verdict = "keep" if decision == Decision.keep and not aside else "discard"
        elif role == ExperimentRole.baseline and not first_baseline_seen:
            verdict = "keep"
        else:
            continue
        if role == ExperimentRole.baseline:
            first_baseline_seen = True
        rows.append(Row(eid, sha, float(val_bpb or 0.0), (vram or 0.0) / 1024.0, verdict, desc))
    return rows


def format_tsv(rows: list[Row]) -> str:
    lines = ["\t".join(HEADER)]
    lines += [f"{r.commit}\t{r.val_bpb:.6f}\t{r.memory_gb:.1f}\t{r.status}\t{r.description}" for r in rows]
    return "\n".join(lines) + "\n"


def results_tsv(session: Session, program: Program) -> str:
    """The program's results.tsv, byte for byte in the reference format."""
    return format_tsv(result_rows(session, program))


def version_key(counts: Mapping[str, int], decisions: Mapping[str, int], created_at: datetime) -> str:
    """What the plot depends on, from a program's experiment counts by status and by decision.

    A run enters the plot when it reaches one of PLOTTED_STATUSES and changes colour when it is decided,
    and neither is ever undone, so these counts only grow: equal keys mean an equal plot. The program's
    creation time (microseconds) leads the key: counts start again from zero in a new database (a second
    `farm demo` on the same address), and its program 1 would otherwise get the first one's immutable charts.
    """
    plotted = sum(counts.get(s.value, 0) for s in PLOTTED_STATUSES)
    born = int(as_utc(created_at).timestamp() * 1_000_000)
    return f"{born}-{plotted}-{decisions.get(Decision.keep.value, 0)}-{decisions.get(Decision.discard.value, 0)}"


def chart_version(session: Session, program_id: int) -> str:
    """version_key from the database: two GROUP BYs the (program_id, status) and (program_id, decision)
    indexes answer alone."""
    counts = session.execute(select(Experiment.status, func.count()).where(Experiment.program_id == program_id)
                             .group_by(Experiment.status)).all()
    decisions = session.execute(select(Experiment.decision, func.count())
                                .where(Experiment.program_id == program_id, Experiment.decision.is_not(None))
                                .group_by(Experiment.decision)).all()
    created = session.execute(select(Program.created_at).where(Program.id == program_id)).scalar_one()
    return version_key({s.value: int(n) for s, n in counts}, {d.value: int(n) for d, n in decisions if d is not None},
                       created)


def thin_points(points: Sequence[tuple[int, float]], x_max: int, columns: int = THIN_COLUMNS,
                limit: int = DRAW_LIMIT) -> list[tuple[int, float]]:
    """At most three points per x column (the lowest, the median and the highest), in x order.

    The lowest matters (a discarded run below the running best is one that did not beat the head by
    enough to be believed); the highest and median keep the spread. Up to `limit` points pass unchanged.
    """
    if len(points) <= limit:
        return list(points)
    width = max(1.0, x_max / columns)
    groups: dict[int, list[tuple[int, float]]] = {}
    for p in points:
        groups.setdefault(int((p[0] - 1) / width), []).append(p)
    out: set[tuple[int, float]] = set()
    for group in groups.values():
        ranked = sorted(group, key=lambda p: (p[1], p[0]))
        out.update((ranked[0], ranked[len(ranked) // 2], ranked[-1]))
    return sorted(out)


def progress_figure(rows: list[Row], title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    measured = [(i, r) for i, r in enumerate(rows, 1) if r.status != "crash"]
    crashes = [i for i, r in enumerate(rows, 1) if r.status == "crash"]
    disc = [(i, r.val_bpb) for i, r in measured if r.status == "discard"]
    kept = [(i, r.val_bpb) for i, r in measured if r.status == "keep"]
    drawn = thin_points(disc, len(rows))
    if drawn:
        ax.scatter([i for i, _ in drawn], [v for _, v in drawn], s=14, color="#9aa5b1", label="discarded", zorder=2)
    if kept:
        best_x, best_y, best = [], [], float("inf")
        for i, v in kept:
            best = min(best, v)
            best_x.append(i)
            best_y.append(best)
        if rows:
            best_x.append(len(rows))
            best_y.append(best)
        ax.step(best_x, best_y, where="post", color="#1a7f37", linewidth=1.8, label="running best", zorder=3)
        ax.scatter([i for i, _ in kept], [v for _, v in kept], s=26, color="#1a7f37", label="kept", zorder=4)
    if crashes:
        ys = [v for _, v in disc + kept]
        y0 = min(ys) if ys else 0.0
        crashes = [i for i, _ in thin_points([(i, y0) for i in crashes], len(rows))]
        ax.scatter(crashes, [y0] * len(crashes), marker="x", s=18, color="#cf222e", label="crash", zorder=2)
    if measured:
        vals = sorted(r.val_bpb for _, r in measured)
        lo, hi = vals[0], vals[min(len(vals) - 1, int(0.95 * len(vals)))]  # outliers do not squash the plot
        pad = max((hi - lo) * 0.08, 1e-4)
        ax.set_ylim(lo - pad, hi + pad)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes,
                color="#57606a")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run, in results.tsv order (not the experiment id)")
    ax.set_ylabel("val_bpb (lower is better)")
    # the title carries the program's name, which a person typed: `$...$` in it is text, not mathtext
    # (an unbalanced or unknown one made the render raise)
    ax.set_title(title, loc="left", fontsize=11, parse_math=False)
    ax.grid(True, color="#eaeef2", linewidth=0.8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if rows:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def progress_image(session: Session, program: Program, fmt: str = "png") -> bytes:
    """The progress plot as PNG or SVG bytes (SVG is deterministic: fixed hash salt, no date)."""
    return render_progress(result_rows(session, program), program.name, fmt)


def render_progress(rows: list[Row], name: str, fmt: str = "png") -> bytes:
    """progress_image from rows already read (the API reads them, ends its transaction, then draws)."""
    import matplotlib

    if fmt not in ("png", "svg"):
        raise ValueError("fmt must be 'png' or 'svg'")
    fig = progress_figure(rows, f"{name}: {len(rows)} runs in results.tsv")
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "researchfarm", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buf.getvalue()


def export(session: Session, program: Program, out_dir: Path) -> list[Path]:
    """Write results.tsv, progress.png and progress.svg into out_dir; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.tsv", out_dir / "progress.png", out_dir / "progress.svg"]
    paths[0].write_text(results_tsv(session, program), encoding="utf-8")
    paths[1].write_bytes(progress_image(session, program, "png"))
    paths[2].write_bytes(progress_image(session, program, "svg"))
    return paths
