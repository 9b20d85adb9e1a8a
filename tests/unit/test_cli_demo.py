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
    board = [{"id": 1, "role": "candidate", "val_bpb": 0.99, "runs": [0.99], "decision": "keep", "commit": "abc",
              "description": MARKUP}]
    assert MARKUP in _printed(leaderboard_table(board))


def test_the_leaderboard_ranks_changes_by_the_mean_of_their_runs(farm_env: dict[str, str]) -> None:
    """Found by review: ranked run by run, a discarded candidate whose one run was a lucky fast one (0.95, its
    confirmation 1.05) headed the demo's board above the kept change; and the board was cut to 10 silently."""
    from cli.demo import leaderboard
    from farm import migrate
    from farm.db import session_scope
    from farm.models import Decision, ExperimentRole, ExperimentStatus, Result
    from farm.settings import get_settings, reset_settings_cache
    from tests.factories import make_experiment, make_program

    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    S, R = ExperimentStatus, ExperimentRole
    with session_scope() as s:
        p = make_program(s)
        rows = [(R.baseline, "a" * 40, None, 1.00, None), (R.baseline, "a" * 40, None, 1.02, None),
                (R.candidate, "b" * 40, Decision.discard, 0.95, None), (R.confirmation, "b" * 40, Decision.discard,
                                                                          1.05, 2),
                (R.candidate, "c" * 40, Decision.keep, 0.98, None), (R.confirmation, "c" * 40, Decision.keep,
                                                                     0.985, 4)]
        ids: list[int] = []
        for role, sha, dec, val, rep in rows:
            e = make_experiment(s, p, status=S.succeeded, role=role, commit_sha=sha, decision=dec,
                                replicate_of=ids[rep] if rep is not None else None, description=f"{role.value} {sha[0]}")
            s.add(Result(experiment_id=e.id, outcome=S.succeeded, val_bpb=val))
            ids.append(e.id)
        pid = p.id
    board, total = leaderboard(pid)
    assert total == 3
    assert [(b["commit"], round(b["val_bpb"], 4), len(b["runs"]), b["decision"]) for b in board] == [
        ("ccccccc", 0.9825, 2, "keep"), ("bbbbbbb", 1.0, 2, "discard"), ("aaaaaaa", 1.01, 2, "")]
    text = _printed(leaderboard_table(board, top=2))
    assert "2 of 3 measured changes" in text and "leaderboard.tsv" in text
