"""`farm demo`'s live view and leaderboard print user and LLM text as typed (no rich markup)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cli.demo import Snapshot, leaderboard_table, render

MARKUP = "scale logits[i] by [/ 2] [bold]x"


def _printed(renderable: object) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_live_view_prints_markup_as_text() -> None:
    row = {"id": 3, "role": "candidate", "status": "running", "progress": 40.0, "loss": 3.1, "val_bpb": None,
           "decision": "", "worker": "host[1]", "retries": 0, "description": MARKUP}
    snap = Snapshot(program={"name": "demo [red]", "branch": "research/demo", "head": "", "status": "active",
                             "budget": 15.0}, rows=[row], counts={"running": 1}, head_val_bpb=None,
                    best_val_bpb=None, first_val_bpb=None, kept=0)
    text = _printed(render(snap, url="http://127.0.0.1:8765/", remaining=60.0, out=Path("/tmp/out[1]")))
    assert MARKUP in text and "host[1]" in text and "demo [red]" in text, text


def test_leaderboard_prints_markup_as_text() -> None:
    board = [{"id": 1, "role": "candidate", "val_bpb": 0.99, "decision": "keep", "commit": "abc", "steps": 10,
              "description": MARKUP}]
    assert MARKUP in _printed(leaderboard_table(board))
