"""Turn the farm's expected failures into one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn


class CLIError(RuntimeError):
    """An error whose message is meant for the user as it is."""


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"farm: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    # SchedulerLockHeld: the repository lock of farm.lineage is one too
    from farm.db import DatabaseUnavailable, SchedulerLockHeld
    from farm.migrate import MigrationError
    from farm.settings import SettingsError

    try:
        return fn()
    except (CLIError, SettingsError, DatabaseUnavailable, SchedulerLockHeld, MigrationError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
