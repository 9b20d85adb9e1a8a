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
    from farm.db import check_migrated, session_scope
    from farm.reports import export as write_export

    check_migrated()
    with session_scope() as session:
        prog = get_program(session, ref=program)
        if prog is None:
            raise CLIError(f"no program {program!r}")
        folder = out or Path(prog.slug)
        try:
            paths = write_export(session, prog, folder)
        except OSError as exc:  # an existing file in the way, no permission, a read-only or full disk
            target = exc.filename if exc.filename is not None else folder
            raise CLIError(f"cannot write the export to {target}: {exc.strerror or exc}") from None
    for p in paths:
        typer.echo(str(p))
