"""Start-up: a worker without a sandbox says so loudly and in `workers`; with bwrap it registers ok."""

from __future__ import annotations

from farm import migrate
from farm.db import session_scope
from farm.models import Worker
from farm.settings import get_settings, reset_settings_cache
from tests.workerkit import FAKE_TEMPLATE
from worker import lifecycle


def _start(monkeypatch, sandbox: str):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FARM_SANDBOX", sandbox)
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(FAKE_TEMPLATE))
    monkeypatch.setenv("FARM_WORKER_ID", f"t:{sandbox}")
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    ctx = lifecycle.start(prepare=True, reaper=False)  # the fake prepare.py runs and succeeds
    with session_scope() as s:
        row = s.get(Worker, ctx.worker_id)
        assert row is not None
        return row.sandbox_ok, row.sandbox, row.hw_class, row.torch_version


def test_no_sandbox_is_reported_loudly(farm_env, monkeypatch, capsys):
    ok, desc, hw, _ = _start(monkeypatch, "none")
    assert not ok and desc.startswith("none") and hw == "cpu"
    assert "SANDBOX NOT AVAILABLE" in capsys.readouterr().err


def test_bubblewrap_works_here(farm_env, monkeypatch):
    ok, desc, _, torch_version = _start(monkeypatch, "auto")
    assert ok and desc.startswith("bwrap") and torch_version
