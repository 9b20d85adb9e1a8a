"""`farm export PROGRAM`: results.tsv, progress.png and progress.svg from the database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import CLIError


def export(
    program: Annotated[str, typer.Argument(help="Program id or slug")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: ./PROGRAM-SLUG)")] = None,
) -> None:
    """Write PROGRAM's results.tsv, progress.png and progress.svg (reads the database directly)."""
    from api.crud import get_program
    from farm.db import check_connection, session_scope
    from farm.reports import export as write_export

    check_connection()
    with session_scope() as session:
        prog = get_program(session, ref=program)
        if prog is None:
            raise CLIError(f"no program {program!r}")
        paths = write_export(session, prog, out or Path(prog.slug))
    for p in paths:
        typer.echo(str(p))
