"""`farm scheduler`: run the research loop (keeps workers fed, judges results, advances branches)."""

from __future__ import annotations

import logging

import typer


def run(once: bool = typer.Option(
            False, "--once", help="Run one pass, wait for the LLM calls it started and store their answers, exit"),
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
            stats = sched.tick()
            # the pass may have started LLM calls: store their answers (paid for) before close() cancels the pool
            for key, n in sched.drain().items():
                stats[key] = stats.get(key, 0) + n
            typer.echo(stats)
        finally:
            sched.close()
        return
    sched.run_forever()
