"""`farm db ...`: schema migrations."""

from __future__ import annotations

import typer

from farm.settings import get_settings, mask_url

app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


def _url() -> str:
    from farm.db import check_connection, make_engine

    url = get_settings().db_url
    engine = make_engine(url)
    try:
        check_connection(engine)
    finally:
        engine.dispose()
    return url


@app.command()
def upgrade(revision: str = typer.Argument("head", help="Target revision")) -> None:
    """Migrate the database to REVISION (default: the latest)."""
    from farm import migrate

    url = _url()
    migrate.upgrade(url, revision)
    typer.echo(f"database {mask_url(url)} at revision {migrate.current(url)}")


@app.command()
def downgrade(revision: str = typer.Argument(..., help="Target revision ('base' for empty)")) -> None:
    """Migrate the database down to REVISION."""
    from farm import migrate

    url = _url()
    migrate.downgrade(url, revision)
    typer.echo(f"database {mask_url(url)} at revision {migrate.current(url) or 'base'}")


@app.command()
def current() -> None:
    """Print the database's current revision."""
    from farm import migrate

    url = _url()
    typer.echo(migrate.current(url) or "base (empty)")
