"""`farm token ...`: API bearer tokens (written straight to the database)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.errors import CLIError

app = typer.Typer(help="API tokens (stored hashed; shown once).", no_args_is_help=True)


@app.command()
def create(name: Annotated[str, typer.Argument(help="Who or what the token is for")]) -> None:
    """Create a token called NAME and print it once."""
    from farm.db import check_migrated, session_scope
    from farm.tokens import TokenError, create_token

    check_migrated()
    try:
        with session_scope() as session:
            new = create_token(session, name=name)
    except TokenError as exc:
        raise CLIError(str(exc)) from None
    typer.echo(new.plain)
    typer.echo(f"token {name!r} created; it is shown only now: export FARM_API_TOKEN={new.plain}", err=True)


@app.command("list")
def list_() -> None:
    """List tokens (names and prefixes; the tokens themselves are not stored)."""
    from farm.db import check_migrated, session_scope
    from farm.tokens import list_tokens

    check_migrated()
    with session_scope() as session:
        for t in list_tokens(session):
            used = t.last_used_at.isoformat(timespec="seconds") if t.last_used_at else "never"
            typer.echo(f"{t.name}\t{t.prefix}...\t{'revoked' if t.revoked else 'active'}\tlast used {used}")


@app.command()
def revoke(name: Annotated[str, typer.Argument(help="The token's name")]) -> None:
    """Revoke the token called NAME."""
    from sqlalchemy import select

    from farm.db import check_migrated, session_scope
    from farm.models import ApiToken
    from farm.settings import get_settings
    from farm.tokens import hash_token, revoke_token

    check_migrated()
    saved_file = get_settings().home / "api-token"  # where `farm up` keeps its token for the CLI
    try:
        saved = saved_file.read_text().strip()
    except OSError:
        saved = ""
    with session_scope() as session:
        if not revoke_token(session, name=name):
            raise CLIError(f"no active token named {name!r}")
        gone = bool(saved) and session.execute(select(ApiToken.revoked).where(
            ApiToken.token_hash == hash_token(saved))).scalar_one_or_none() is True
    typer.echo(f"token {name!r} revoked")
    if gone:  # the CLI read it and got 401 with no hint why (found by review); `farm up` makes a new one
        saved_file.unlink(missing_ok=True)
        typer.echo(f"removed {saved_file}, which held it (the next `farm up` creates a new token)")
