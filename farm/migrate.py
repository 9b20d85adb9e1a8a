"""Run Alembic migrations from code (the `farm db` commands and `farm up` use this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    return cfg


class MigrationError(RuntimeError):
    """A migration that cannot run, said in one line: an unknown revision, or a database newer than this code."""


def _migrate(step: Callable[[Config, str], None], url: str, revision: str) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    cfg = alembic_config(url)
    try:
        step(cfg, revision)
    except CommandError as exc:  # a traceback of Alembic's internals said only this, at its end
        script = ScriptDirectory.from_config(cfg)
        known = [r.revision for r in reversed(list(script.walk_revisions()))]
        at = current(url)
        if at is not None and at not in known:
            raise MigrationError(f"the database is at revision {at}, which this farm does not know (its latest is "
                                 f"{script.get_current_head()}): it was migrated by a newer researchfarm; run "
                                 f"that version's code, or `farm db downgrade` with it first") from None
        raise MigrationError(f"{exc} (revisions: base, {', '.join(known)}, head; the database is at "
                             f"{at or 'base'})") from None


def upgrade(url: str, revision: str = "head") -> None:
    _migrate(command.upgrade, url, revision)


def downgrade(url: str, revision: str = "base") -> None:
    _migrate(command.downgrade, url, revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from farm.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
