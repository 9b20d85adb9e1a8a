"""`farm demo`: a short, real research session on this machine, then its results.

Starts the same children as `farm up` (API + dashboard, scheduler, one CPU worker) on a fresh
farm home under the output folder, submits the example research program
(docs/examples/program.md) on the cpu profile, shows every experiment and the branch head live,
stops the farm at the deadline and writes the leaderboard, results.tsv and progress.png.

The proposer is the mutation proposer (no LLM, no network), or the configured LLM when
FARM_LLM_MODEL is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cli.errors import CLIError
from cli.up import (
    ROOT,
    Farm,
    StopSignal,
    child_specs,
    dashboard_url,
    port_in_use,
    prepare,
    release_interrupted,
)
from farm.settings import Settings, get_settings, reset_settings_cache

EXAMPLE_PROGRAM = ROOT / "docs" / "examples" / "program.md"
HOME_MARKER = ".farm-demo-home"
STOP_GRACE = 10.0  # an idle worker takes about 6 s to shut down on a loaded 2-core machine
FINISHED = ("succeeded", "crashed", "timed_out", "refused", "lost", "invalid", "cancelled")


@dataclass
class Snapshot:
    """What the live view shows, read from the database in one short transaction."""

    program: dict[str, Any]
    rows: list[dict[str, Any]]
    counts: dict[str, int]
    head_val_bpb: float | None
    best_val_bpb: float | None
    first_val_bpb: float | None
    kept: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_home(out: Path) -> Path:
    """FARM_HOME for the demo: as set by the user, else a fresh one under the output folder."""
    if os.environ.get("FARM_HOME"):
        return Path(os.environ["FARM_HOME"]).expanduser().resolve()
    home = (out / "home").resolve()
    if home.exists():
        if not (home / HOME_MARKER).exists():
            raise CLIError(f"{home} exists and was not made by `farm demo`; pick another --out")
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / HOME_MARKER).write_text("made by `farm demo`; deleted by the next one\n")
    os.environ["FARM_HOME"] = str(home)
    return home


def demo_settings(out: Path) -> Settings:
    setup_home(out)
    reset_settings_cache()  # the root callback read the settings before FARM_HOME was chosen
    if not os.environ.get("FARM_API_PORT"):
        probe = get_settings()
        if port_in_use(probe.api_host, probe.api_port):  # e.g. a `farm up` already on the default port
            os.environ["FARM_API_PORT"] = str(_free_port())
    reset_settings_cache()
    return get_settings()


def submit_program(settings: Settings, *, budget: float, name: str) -> int:
    from farm.db import session_scope
    from farm.programs import create_program

    proposer: dict[str, Any] = {"kind": "llm"} if settings.llm_model else {"kind": "mutation"}
    with session_scope() as session:
        program = create_program(session, name=name, instructions=EXAMPLE_PROGRAM.read_text(), profile="cpu",
                                 time_budget=budget, proposer=proposer)
        return int(program.id)


def snapshot(program_id: int, limit: int = 14) -> Snapshot:
    from sqlalchemy import func, select

    from farm.db import session_scope
    from farm.models import Decision, Experiment, ExperimentRole, ExperimentStatus, Program, Result

    with session_scope() as s:
        p = s.get(Program, program_id)
        assert p is not None
        program = {"name": p.name, "branch": p.branch, "head": (p.head_commit or "")[:10],
                   "status": p.status.value, "budget": p.time_budget}
        counts = {str(k): int(v) for k, v in s.execute(
            select(Experiment.status, func.count()).where(Experiment.program_id == program_id)
            .group_by(Experiment.status)).all()}
        rows = []
        stmt = (select(Experiment, Result.val_bpb).outerjoin(Result, Result.experiment_id == Experiment.id)
                .where(Experiment.program_id == program_id).order_by(Experiment.id.desc()).limit(limit))
        for exp, val in s.execute(stmt).all():
            rows.append({"id": exp.id, "role": exp.role.value, "status": exp.status.value,
                         "progress": exp.progress, "loss": exp.current_loss, "val_bpb": val,
                         "decision": exp.decision.value if exp.decision else "",
                         "worker": exp.worker_id or "", "retries": exp.retry_count,
                         "description": " ".join((exp.description or exp.status_reason or "").split())})
        measured = select(Result.val_bpb).join(Experiment, Experiment.id == Result.experiment_id).where(
            Experiment.program_id == program_id, Experiment.status == ExperimentStatus.succeeded,
            Result.val_bpb.is_not(None))
        head_val = None
        if p.head_commit is not None:  # the mean of the head's runs, as the policy counts them (none set aside)
            head_val = s.execute(select(func.avg(Result.val_bpb)).join(Experiment, Experiment.id == Result.experiment_id)
                                 .where(Experiment.program_id == program_id, Experiment.commit_sha == p.head_commit,
                                        Experiment.status == ExperimentStatus.succeeded,
                                        Experiment.set_aside.is_(False))).scalar()
        best = s.execute(select(func.min(Result.val_bpb)).where(
            Result.experiment_id.in_(select(Experiment.id).where(
                Experiment.program_id == program_id, Experiment.decision == Decision.keep,
                Experiment.set_aside.is_(False)))
        )).scalar()
        first = s.execute(measured.where(Experiment.role == ExperimentRole.baseline)
                          .order_by(Experiment.finished_at, Experiment.id).limit(1)).scalar()
        kept = int(s.execute(select(func.count()).where(Experiment.program_id == program_id,
                                                        Experiment.decision == Decision.keep)).scalar() or 0)
    return Snapshot(program, rows, counts, head_val, best, first, kept)


def typical_run_seconds(program_id: int, budget: float) -> float:
    """Median wall time of this program's finished runs (claim to result); a guess before any."""
    from sqlalchemy import select

    from farm.db import as_utc, session_scope
    from farm.models import Experiment

    with session_scope() as s:
        rows = s.execute(select(Experiment.started_at, Experiment.finished_at).where(
            Experiment.program_id == program_id, Experiment.started_at.is_not(None),
            Experiment.finished_at.is_not(None))).all()
    spans = sorted((as_utc(f) - as_utc(b)).total_seconds() for b, f in rows)
    return spans[len(spans) // 2] if spans else budget + 40.0


def wind_down(program_id: int) -> None:
    """No new candidates from now on (the scheduler's `deadline` stop rule); runs already queued and
    confirmations of promising candidates still run, so the demo ends on decisions, not on
    half-measured candidates."""
    from farm.db import db_now, session_scope
    from farm.models import Program

    with session_scope() as s:
        p = s.get(Program, program_id)
        assert p is not None
        p.stop_rules = {**(p.stop_rules or {}), "deadline": db_now(s).isoformat()}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def render(snap: Snapshot, *, url: str, remaining: float, out: Path) -> Group:
    p = snap.program
    head = p["head"] or "(not created yet)"
    lines = Text()
    lines.append(f"program {p['name']}  branch {p['branch']}  head ", style="bold")
    lines.append(head, style="bold cyan")
    if snap.head_val_bpb is not None:
        lines.append(f"  head val_bpb {snap.head_val_bpb:.4f}", style="bold green")
    if snap.first_val_bpb is not None:
        lines.append(f"  (first baseline {snap.first_val_bpb:.4f}, {snap.kept} kept)")
    lines.append(f"\ndashboard {url}   time left {int(remaining // 60)}:{int(remaining % 60):02d}"
                 f"   output {out}\n")
    lines.append("  ".join(f"{k} {v}" for k, v in sorted(snap.counts.items())) or "waiting for the first proposal")
    table = Table(expand=True, show_lines=False)
    for col, kw in (("#", {"justify": "right"}), ("role", {}), ("status", {}), ("progress", {"justify": "right"}),
                    ("val_bpb", {"justify": "right"}), ("decision", {}), ("worker", {}),
                    ("description", {"overflow": "ellipsis", "no_wrap": True, "ratio": 1})):
        table.add_column(col, **kw)  # type: ignore[arg-type]
    colours = {"running": "yellow", "succeeded": "green", "crashed": "red", "timed_out": "red",
               "invalid": "magenta", "lost": "red", "refused": "red", "queued": "blue"}
    for r in snap.rows:
        prog = f"{r['progress']:.0f}%" if r["status"] == "running" and r["progress"] is not None else ""
        status = r["status"] + (f" (retry {r['retries']})" if r["retries"] else "")
        dec = Text(r["decision"], style="bold green" if r["decision"] == "keep" else "")
        # descriptions are LLM text and worker ids host names: Text, so `[...]` is not read as markup
        table.add_row(str(r["id"]), r["role"], Text(status, style=colours.get(r["status"], "")), prog,
                      _fmt(r["val_bpb"]), dec, Text(r["worker"]), Text(r["description"]))
    return Group(Panel(lines, title="researchfarm demo", border_style="cyan"), table)


def _plain_changes(snap: Snapshot, seen: dict[int, str], console: Console) -> None:
    """Without a terminal (CI, a pipe): one line per experiment state change instead of a live table."""
    for r in reversed(snap.rows):
        key = f"{r['status']}/{r['decision']}"
        if seen.get(r["id"]) != key:
            seen[r["id"]] = key
            val = f" val_bpb {r['val_bpb']:.4f}" if r["val_bpb"] is not None else ""
            dec = f" -> {r['decision']}" if r["decision"] else ""
            console.print(f"  experiment {r['id']} [{r['role']}] {r['status']}{val}{dec}  {r['description'][:80]}",
                          markup=False, highlight=False)


def leaderboard(program_id: int, top: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The program's measured changes (one row per commit: its runs, confirmations included, and their mean),
    lowest mean first; and how many there are. Ranked run by run, a discarded candidate whose one fast run was
    luck headed the board (found by review)."""
    from statistics import fmean

    from sqlalchemy import select

    from farm.db import session_scope
    from farm.models import Experiment, ExperimentStatus, Result

    with session_scope() as s:
        rows = s.execute(select(Experiment, Result.val_bpb).join(Result, Result.experiment_id == Experiment.id)
                         .where(Experiment.program_id == program_id, Experiment.status == ExperimentStatus.succeeded,
                                Result.val_bpb.is_not(None), Experiment.set_aside.is_(False))  # as the policy counts
                         .order_by(Experiment.id)).all()
        changes: dict[str, dict[str, Any]] = {}
        for e, val in rows:
            key = e.commit_sha or f"experiment {e.id}"
            c = changes.setdefault(key, {"id": e.id, "role": e.role.value, "runs": [], "decision": "",
                                         "commit": (e.commit_sha or e.parent_commit or "")[:7],
                                         "description": " ".join((e.description or "").split())})
            c["runs"].append(float(val))
            if e.replicate_of is None and e.decision is not None:
                c["decision"] = e.decision.value  # the judged run's verdict is the change's
    board = sorted(changes.values(), key=lambda c: (fmean(c["runs"]), c["id"]))
    for c in board:
        c["val_bpb"] = fmean(c["runs"])
    return board[:top] if top is not None else board, len(board)


def write_outputs(program_id: int, out: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    from farm import reports
    from farm.db import session_scope
    from farm.models import Program

    out.mkdir(parents=True, exist_ok=True)
    with session_scope() as s:
        program = s.get(Program, program_id)
        assert program is not None
        paths = list(reports.export(s, program, out))
    board, _ = leaderboard(program_id)
    lines = ["rank\tval_bpb_mean\truns\tdecision\trole\texperiment\tcommit\tdescription"]
    lines += [f"{i}\t{r['val_bpb']:.6f}\t{len(r['runs'])}\t{r['decision'] or '-'}\t{r['role']}\t{r['id']}\t"
              f"{r['commit']}\t{r['description']}" for i, r in enumerate(board, 1)]
    board_path = out / "leaderboard.tsv"
    board_path.write_text("\n".join(lines) + "\n")
    return [*paths, board_path], board


def leaderboard_table(board: list[dict[str, Any]], top: int = 10) -> Table:
    shown = board[:top]
    table = Table(title=f"leaderboard: {len(shown)} of {len(board)} measured changes, lowest mean val_bpb first "
                        "(all in leaderboard.tsv)" if len(board) > top else
                        "leaderboard: measured changes, lowest mean val_bpb first")
    for col in ("rank", "val_bpb", "runs", "decision", "role", "#", "description"):
        table.add_column(col)
    for i, r in enumerate(shown, 1):
        table.add_row(str(i), f"{r['val_bpb']:.4f}", str(len(r["runs"])), r["decision"] or "-", r["role"],
                      str(r["id"]), Text(r["description"][:70]))
    return table


def run_demo(*, minutes: float, budget: float, out: Path, workers: int) -> int:
    # without a terminal (CI, a pipe) rich would wrap at 80 columns; log lines read better wider
    console = Console() if sys.stdout.isatty() else Console(width=160)
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(out)
    if port_in_use(settings.api_host, settings.api_port):
        raise CLIError(f"port {settings.api_port} is in use; set FARM_API_PORT to a free one")
    mode = f"LLM {settings.llm_model}" if settings.llm_model else "mutation proposer (no LLM)"
    console.print(f"[bold]farm demo[/]: {minutes:g} min of research on the cpu profile, {budget:g} s per run, "
                  + escape(f"{mode}; farm home {settings.home}"))
    info = prepare(settings, quiet=True)
    program_id = submit_program(settings, budget=budget, name="demo: faster small GPT")
    # CPU workers even on a GPU machine: the demo's program is on the cpu profile
    farm = Farm(settings, child_specs(settings, cpu=True, workers=workers), grace=STOP_GRACE,
                echo=lambda m: console.print(f"[yellow]farm demo:[/] {escape(m)}", highlight=False))
    url = dashboard_url(settings)
    interrupted = False
    with StopSignal() as stop:
        farm.start()
        started = time.monotonic()
        deadline = started + minutes * 60
        if farm.wait_for_api(timeout=60, cancel=lambda: stop.requested):
            console.print(f"dashboard: [bold cyan]{escape(url)}[/]" + (f"   token: {info.plain}" if info.plain else ""))
        else:
            console.print("[red]the API did not come up[/]; see " + escape(str(settings.logs_dir / "api.log")))
        seen: dict[int, str] = {}
        winding_down = False
        live_ok = console.is_terminal
        live = Live(console=console, refresh_per_second=2, transient=False) if live_ok else None
        try:
            if live is not None:
                live.start()
            while time.monotonic() < deadline and not stop.requested and farm.poll():
                remaining = deadline - time.monotonic()
                if not winding_down and remaining < 2 * typical_run_seconds(program_id, budget):
                    winding_down = True
                    wind_down(program_id)
                    console.print(f"{int(remaining)} s left: no new candidates; queued runs and confirmations "
                                  "finish", highlight=False)
                snap = snapshot(program_id)
                if live is not None:
                    live.update(render(snap, url=url, remaining=deadline - time.monotonic(), out=out))
                else:
                    _plain_changes(snap, seen, console)
                time.sleep(1.0)
        finally:
            if live is not None:
                live.stop()
        interrupted = stop.requested
        console.print("stopping the farm" + (" (interrupted)" if interrupted else " (time is up)"))
        farm.stop(force=lambda: stop.forced)
    release_interrupted(farm.worker_ids(), settings)  # tidy: nothing is left `running` in the demo's home
    snap = snapshot(program_id)
    paths, board = write_outputs(program_id, out)
    console.print(leaderboard_table(board))
    head = snap.program["head"] or "-"
    console.print(f"branch {snap.program['branch']} head {head}; experiments: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(snap.counts.items())))
    if snap.first_val_bpb is not None and snap.best_val_bpb is not None:
        console.print(f"val_bpb {snap.first_val_bpb:.4f} (first baseline) -> {snap.best_val_bpb:.4f} (best kept)")
    elif snap.first_val_bpb is not None:  # said plainly: the board's first line may still be a discarded change
        console.print("no change was kept: none beat the baseline by more than the measured noise "
                      "(docs/policy.md); the head is still the template")
    console.print(f"outputs in [bold]{escape(str(out))}[/]: " + escape(", ".join(p.name for p in paths)))
    console.print(escape(f"the farm repository is {settings.repo_dir} (branch {snap.program['branch']})"))
    if farm.failed:
        console.print(f"[red]{escape(farm.failed)}[/]")
        return 1
    return 130 if interrupted else 0


def demo(
    minutes: float = typer.Option(5.0, "--minutes", min=0.1, help="How long the farm runs."),
    budget: float = typer.Option(15.0, "--budget", min=1.0, help="Training seconds per experiment."),
    out: Path = typer.Option(Path("demo-output"), "--out", help="Where the results (and a fresh farm home) go."),
    workers: int = typer.Option(1, "--workers", min=1, help="CPU workers."),
) -> None:
    """A short research run on this machine: live progress, then leaderboard, results.tsv, progress.png."""
    raise typer.Exit(run_demo(minutes=minutes, budget=budget, out=out, workers=workers))
