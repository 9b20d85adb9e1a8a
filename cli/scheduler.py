"""`farm scheduler`: run the research loop (keeps workers fed, judges results, advances branches)."""

from __future__ import annotations

import logging

import typer


def run(once: bool = typer.Option(False, "--once", help="Run one pass and exit"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging")) -> None:
    """Run the scheduler until interrupted (SIGINT/SIGTERM stop it cleanly; restart at any time)."""
    from farm.db import check_connection
    from scheduler.loop import Scheduler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_connection()
    sched = Scheduler()
    if once:
        try:
            typer.echo(sched.tick())
        finally:
            sched.close()
        return
    sched.run_forever()
