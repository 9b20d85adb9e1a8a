"""The CLI commands that read the database directly (`farm token ...`, `farm export`) answer an
unmigrated database and an unwritable export folder with one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session


def _farm(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FARM_") or k.startswith("FARM_TEST_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=full,
                          timeout=120, cwd=cwd, check=False)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("args", [("token", "create", "me"), ("token", "list"), ("token", "revoke", "me"),
                                  ("export", "1")])
def test_an_unmigrated_database_is_one_line_naming_the_upgrade(tmp_path: Path, args: tuple[str, ...]) -> None:
    # every 401 tells people to run `farm token create NAME`: on a fresh FARM_HOME that was a
    # "no such table: api_tokens" traceback, and an empty farm.db was left behind
    home = tmp_path / "fresh"
    line = _one_line(_farm(*args, cwd=tmp_path, FARM_HOME=str(home)))
    assert "not migrated" in line and "farm db upgrade" in line and str(home / "farm.db") in line, line
    assert not (home / "farm.db").exists()


def test_an_empty_database_file_is_reported_as_unmigrated(tmp_path: Path) -> None:
    (tmp_path / "farm.db").touch()  # what the old `farm token create` left behind
    line = _one_line(_farm("token", "create", "me", cwd=tmp_path, FARM_HOME=str(tmp_path)))
    assert "not migrated" in line and "farm db upgrade" in line, line


@pytest.fixture
def home_with_a_program(tmp_path: Path) -> Path:
    from farm import migrate
    from farm.db import make_engine
    from farm.programs import create_program

    home = tmp_path / "home"
    url = f"sqlite:///{home / 'farm.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            create_program(session, name="export me", instructions="x", profile="cpu")
            session.commit()
    finally:
        engine.dispose()
    return home


def test_export_into_a_path_that_cannot_be_a_folder_is_one_line(home_with_a_program: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing_file"
    existing.write_text("not a folder\n")
    for out in (existing, Path("/proc/nope")):
        line = _one_line(_farm("export", "1", "--out", str(out), cwd=tmp_path, FARM_HOME=str(home_with_a_program)))
        assert str(out) in line, line
    assert existing.read_text() == "not a folder\n"


def test_token_create_and_export_work_on_a_migrated_database(home_with_a_program: Path, tmp_path: Path) -> None:
    r = _farm("token", "create", "me", cwd=tmp_path, FARM_HOME=str(home_with_a_program))
    assert r.returncode == 0 and r.stdout.startswith("rf_"), r.stderr
    r = _farm("export", "1", "--out", str(tmp_path / "out"), cwd=tmp_path, FARM_HOME=str(home_with_a_program))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "results.tsv").is_file()
