"""Entry point of the `farm` console script."""

from __future__ import annotations

import typer

from cli import db, export, leaderboard, scheduler, serve, status, submit, token, worker
from cli.errors import run_guarded

app = typer.Typer(help="researchfarm: an LLM-driven training research farm.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(db.app, name="db")
app.command("scheduler")(scheduler.run)
app.command(name="worker")(worker.worker)
app.add_typer(token.app, name="token")
app.command("submit")(submit.submit)
app.command("status")(status.status)
app.command("leaderboard")(leaderboard.leaderboard)
app.command("export")(export.export)
app.command("api")(serve.api)


@app.callback()
def _root() -> None:
    """Validate settings before any command runs, so a bad value is one clear line."""
    from farm.settings import get_settings

    get_settings()


def main() -> None:
    run_guarded(app)


if __name__ == "__main__":
    main()
