"""The CLI answers bad input with one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _farm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FARM_") or k.startswith("FARM_TEST_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=full, timeout=120)


@pytest.mark.parametrize("command", [("db", "upgrade"), ("up", "--cpu")])
def test_unreachable_database_is_one_line_with_masked_password(tmp_path, command):
    """`farm up` too (found by review: its check for another scheduler met the outage first, with a traceback)."""
    r = _farm(*command, FARM_HOME=str(tmp_path), FARM_API_PORT="1",
              FARM_DATABASE_URL="postgresql+psycopg://farm:s3cret@127.0.0.1:1/nope")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "127.0.0.1:1/nope" in lines[0] and "s3cret" not in r.stderr and "***" in lines[0]
    assert "Traceback" not in r.stderr


def test_negative_heartbeat_refused_at_startup(tmp_path):
    r = _farm("db", "current", FARM_HOME=str(tmp_path), FARM_HEARTBEAT_INTERVAL="-1")
    assert r.returncode != 0
    assert "FARM_HEARTBEAT_INTERVAL" in r.stderr and "Traceback" not in r.stderr


def test_db_upgrade_on_embedded_default(tmp_path):
    r = _farm("db", "upgrade", FARM_HOME=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "farm.db").exists()
    r = _farm("db", "current", FARM_HOME=str(tmp_path))
    assert r.stdout.strip() == "0008"


def test_an_unknown_revision_or_a_newer_database_is_one_line(tmp_path):
    """Found by review: `farm db upgrade nonsense`, and `farm db upgrade` (or `farm up`) on a database a newer farm
    migrated, printed Alembic's 100-line traceback."""
    import sqlite3

    for cmd in (("upgrade", "nonsense"), ("downgrade", "0003x")):
        r = _farm("db", *cmd, FARM_HOME=str(tmp_path))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and cmd[1] in lines[0], r.stderr
        assert "revisions: base, 0001" in lines[0]
    assert _farm("db", "upgrade", FARM_HOME=str(tmp_path)).returncode == 0
    with sqlite3.connect(tmp_path / "farm.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    r = _farm("db", "upgrade", FARM_HOME=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "farm: error: the database is at revision 0099, which this farm does not know (its latest is 0008): it was "
        "migrated by a newer researchfarm; run that version's code, or `farm db downgrade` with it first"]


def test_submit_of_a_file_that_is_not_utf8_is_one_line(tmp_path):
    md = tmp_path / "latin1.md"
    md.write_bytes("# Café study\nlower val_bpb\n".encode("latin-1"))
    r = _farm("submit", str(md), FARM_HOME=str(tmp_path), FARM_API_URL="http://127.0.0.1:1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "UTF-8" in r.stderr and str(md) in r.stderr, r.stderr


def test_bad_api_url_is_one_line(tmp_path):
    for url in ("http://127.0.0.1:87650", "http://127.0.0.1:abc", "http://[::1"):
        r = _farm("status", FARM_HOME=str(tmp_path), FARM_API_URL=url)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (url, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "FARM_API_URL" in r.stderr, (url, r.stderr)
