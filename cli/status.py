"""`farm status`: programs and workers, with live progress bars (`--watch`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.client import Api

STATE_STYLE = {"alive": "green", "stale": "yellow", "stopped": "dim"}


def _fmt(v: float | None, digits: int = 6) -> str:
    return f"{v:.{digits}f}" if v is not None else "-"


def render(programs: list[dict[str, Any]], workers: list[dict[str, Any]]) -> Group:
    # worker ids, GPU names and descriptions come from hosts, people and LLMs: Text cells, so `[...]`
    # in them prints as typed instead of being read as rich markup
    pt = Table(title="programs", title_justify="left", expand=True, header_style="bold")
    for col in ("id", "program", "status", "best val_bpb", "baseline", "done", "running", "queued", "failed"):
        pt.add_column(col, justify="right" if col not in ("program", "status") else "left")
    for p in programs:
        c = p["counts"]
        failed = sum(c.get(k, 0) for k in ("crashed", "timed_out", "refused", "lost"))
        pt.add_row(str(p["id"]), Text(p["slug"]), p["status"], _fmt((p.get("best") or {}).get("val_bpb")),
                   _fmt(p.get("baseline_val_bpb")), str(c.get("succeeded", 0)), str(c.get("running", 0)),
                   str(c.get("queued", 0) + c.get("proposed", 0)), str(failed))
    wt = Table(title="workers", title_justify="left", expand=True, header_style="bold")
    for col in ("worker", "gpu", "state", "experiment", "progress", "loss", "heartbeat"):
        wt.add_column(col)
    for w in workers:
        prog = w.get("progress")
        bar: Any = (Group(ProgressBar(total=100, completed=prog, width=24), Text(f"{prog:5.1f}%"))
                    if prog is not None and w.get("current_experiment_id") else Text("idle", style="dim"))
        exp = (f"#{w['current_experiment_id']} {w.get('current_description') or ''}"[:40]
               if w.get("current_experiment_id") else "-")
        wt.add_row(Text(w["id"]), Text(w.get("gpu_name") or w["hw_class"]),
                   Text(w["state"], style=STATE_STYLE.get(w["state"], "")), Text(exp), bar,
                   _fmt(w.get("current_loss"), 3), f"{w['seconds_since_heartbeat']:.0f}s ago")
    if not workers:
        wt.add_row("-", "-", "no workers registered", "-", "", "", "")
    return Group(pt, wt)


def status(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch")] = 2.0,
) -> None:
    """Programs and workers (with live progress bars under --watch)."""
    console = Console()
    with Api() as api:
        def snapshot() -> Group:
            return render(api.get("/programs"), api.get("/workers"))

        if not watch:
            console.print(snapshot())
            return
        with Live(snapshot(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(max(0.2, interval))
                live.update(snapshot())
