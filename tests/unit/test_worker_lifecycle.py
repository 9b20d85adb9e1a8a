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


def test_start_sweeps_this_workers_leftover_workdirs_and_a_bloated_compile_cache(farm_env, monkeypatch):
    """Found by review: a worker killed mid-run left its workdir (150 MB a candidate wrote) forever, and junk a
    candidate wrote into the shared compile cache stayed there across runs."""
    from worker.disk import workdir_name

    monkeypatch.setenv("FARM_COMPILE_CACHE_MB", "1")
    s = get_settings()
    work = s.workdirs
    mine = work / workdir_name("t_none", 7, 0, "abc123")
    mine_eval = work / f"{workdir_name('t_none', 7, 0, 'abc123')}-eval"  # the isolated evaluation's folder
    other = work / workdir_name("t_none0", 7, 0, "abc123")  # another worker whose name starts the same
    stray = work / "t_none-notes"
    for d in (mine, mine_eval, other, stray):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x" * 10)
    cache = s.cache_dir / "compile" / "t_none"
    (cache / "inductor" / "junk").mkdir(parents=True)
    (cache / "inductor" / "junk" / "blob").write_bytes(b"\0" * (2 << 20))
    _start(monkeypatch, "none")
    assert not mine.exists() and not mine_eval.exists() and other.exists() and stray.exists()
    assert (cache / "inductor").is_dir() and not (cache / "inductor" / "junk").exists()


def test_a_cache_under_its_limit_is_kept_and_only_the_last_run_trims(tmp_path):
    from worker import disk

    cache = tmp_path / "c"
    (cache / "triton").mkdir(parents=True)
    (cache / "triton" / "k").write_bytes(b"\0" * (2 << 20))
    assert not disk.trim_compile_cache(cache, 3) and (cache / "triton" / "k").exists()
    disk.begin_run()
    disk.begin_run()
    disk.end_run(cache, 1)  # the other run may be compiling into it: kept
    assert (cache / "triton" / "k").exists()
    disk.end_run(cache, 1)
    assert not (cache / "triton" / "k").exists() and (cache / "triton").is_dir()
