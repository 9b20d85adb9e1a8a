"""`farm leaderboard PROGRAM`: a program's best runs, lowest val_bpb first."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import Api, ApiError, segment
from cli.errors import CLIError


def leaderboard(
    program: Annotated[str, typer.Argument(help="Program id or slug")],
    limit: Annotated[int, typer.Option(help="Rows to show")] = 20,
    kept: Annotated[bool, typer.Option("--kept", help="Only runs the policy kept")] = False,
) -> None:
    """The best measured runs of PROGRAM, lowest val_bpb first."""
    params: dict[str, str | int] = {"status": "succeeded", "sort": "val_bpb", "order": "asc", "limit": limit}
    if kept:
        params["decision"] = "keep"
    with Api() as api:
        try:
            info = api.get(f"/programs/{segment(program)}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            # `a/b` reaches no route at all, and its 404 said only "Not Found" (found by review)
            raise CLIError(f"no program {program!r}: give its id or slug (`farm status` lists them)") from None
        page = api.get(f"/programs/{segment(program)}/experiments", params=params)
    sigma = info.get("noise_sigma")
    # names and descriptions are people's and LLMs' text: Text cells, so `[...]` in them is not rich markup
    table = Table(title=Text(f"{info['name']} ({info['slug']}): {page['total']} measured runs"
                             + (f", noise sigma {sigma:.5f}" if sigma is not None else ""), style="table.title"),
                  title_justify="left", header_style="bold")
    for col in ("#", "exp", "val_bpb", "delta", "decision", "commit", "description"):
        table.add_column(col, justify="right" if col in ("#", "exp", "val_bpb", "delta") else "left")
    # a run its change's decision set aside (a broken measurement) is no kept result, whatever its change's verdict
    items = [e for e in page["items"] if not (kept and e.get("set_aside"))]
    for rank, e in enumerate(items, 1):
        delta = f"{e['delta']:+.6f}" if e.get("delta") is not None else "-"
        decision = "set aside" if e.get("set_aside") else e.get("decision") or "-"
        table.add_row(str(rank), str(e["id"]), f"{e['val_bpb']:.6f}" if e["val_bpb"] is not None else "-", delta,
                      decision, (e.get("commit_sha") or "")[:7], Text(e["description"][:60]))
    Console().print(table)
