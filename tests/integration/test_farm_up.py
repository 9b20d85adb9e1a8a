"""`farm up` in the embedded mode (SQLite + filesystem broker, no server), end to end:

submit a program over REST, see experiments finish, SIGKILL the worker mid-run (farm up restarts
it, the reaper re-queues the run, it completes), stop the farm with SIGINT, start it again and see
the program continue, with no experiment lost or run twice.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.integration.farmproc import (
    FarmProcess,
    child_running,
    clean_env,
    descendants,
    free_port,
    logs_tail,
    wait_for,
    wait_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

FINISHED = ("succeeded", "crashed", "timed_out", "refused", "lost", "invalid")


def _rows(db: Path, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute(sql, args).fetchall()


def _experiments(db: Path, program_id: int) -> dict[int, dict]:
    rows = _rows(db, "SELECT id, status, retry_count, role, content_hash, replicate_of, progress FROM experiments "
                     "WHERE program_id = ?", program_id)
    return {r[0]: {"status": r[1], "retries": r[2], "role": r[3], "hash": r[4], "replicate_of": r[5],
                   "progress": r[6]} for r in rows}


def test_farm_up_survives_a_killed_worker_and_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    token = "rf_" + secrets.token_urlsafe(24)
    env = clean_env(FARM_HOME=str(home), FARM_API_PORT=str(port), FARM_API_TOKEN=token,
                    FARM_HEARTBEAT_INTERVAL="1", FARM_SCHEDULER_INTERVAL="0.5")
    url = f"http://127.0.0.1:{port}"
    db = home / "farm.db"
    auth = {"Authorization": f"Bearer {token}"}
    farm = FarmProcess(["up", "--cpu", "--grace", "15"], env, tmp_path / "up.log")

    def diag() -> str:
        return f"== farm up output\n{farm.output()[-3000:]}\n== logs\n{logs_tail(home)}"

    try:
        # ---- first life: submit over REST, watch experiments finish
        farm.start()
        wait_healthy(url, farm)
        assert "dashboard: http://127.0.0.1:" in farm.output()
        resp = httpx.post(f"{url}/programs", headers=auth, timeout=30, json={
            "name": "farm up test", "instructions": "Lower val_bpb.", "profile": "cpu", "time_budget": 3,
            "proposer": {"kind": "mutation"}, "policy": {"baseline_runs": 1, "confirm_runs": 0}})
        assert resp.status_code == 201, resp.text
        program_id = resp.json()["id"]

        def n_succeeded() -> int:
            return sum(e["status"] == "succeeded" for e in _experiments(db, program_id).values())

        wait_for(lambda: n_succeeded() >= 1, 300, "the first experiment to finish", diag)

        # ---- SIGKILL the worker in the middle of a run: claimed, and its training process alive
        def worker_mid_run() -> tuple[int, int] | None:
            worker_pid = child_running(farm.pid, "worker")
            if worker_pid is None or not descendants(worker_pid):
                return None
            running = [eid for eid, e in _experiments(db, program_id).items() if e["status"] == "running"]
            if len(running) != 1 or not descendants(worker_pid):
                return None
            return running[0], worker_pid

        victim, worker_pid = wait_for(worker_mid_run, 300, "the worker in the middle of a run", diag, poll=0.2)
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(lambda: "exited with code -9; restarting it" in farm.output(), 30,
                 "farm up to report and restart the killed worker", diag)
        wait_for(lambda: _experiments(db, program_id)[victim]["status"] in FINISHED, 300,
                 f"experiment {victim} (its worker was killed) to finish after the restart", diag)
        killed = _experiments(db, program_id)[victim]
        # completed = ran to an outcome with its one result (a mutated candidate may crash on its own merits)
        assert killed["status"] in ("succeeded", "crashed", "timed_out"), (killed, diag())
        assert _rows(db, "SELECT COUNT(*) FROM results WHERE experiment_id = ?", victim)[0][0] == 1
        assert killed["retries"] >= 1, f"experiment {victim} finished without being re-queued: {killed}"

        # ---- stop with SIGINT: a clean exit
        farm.signal(signal.SIGINT)
        assert farm.wait(timeout=90) == 0, diag()
        assert child_running(farm.pid, "worker") is None
        before = _experiments(db, program_id)
        assert before, "no experiments before the restart"
        unfinished = {eid for eid, e in before.items() if e["status"] not in FINISHED}
        done_before = {eid for eid, e in before.items() if e["status"] in FINISHED}
        head_before = _rows(db, "SELECT head_commit FROM programs WHERE id = ?", program_id)[0][0]

        # ---- second life: the program continues where it stopped
        farm2 = FarmProcess(["up", "--cpu", "--grace", "15"], env, tmp_path / "up2.log")
        farm = farm2
        farm.start()
        wait_healthy(url, farm)
        assert "created the first API token" not in farm.output()
        resp = httpx.get(f"{url}/programs/{program_id}", headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text

        def progressed() -> bool:
            now = _experiments(db, program_id)
            newly_done = {eid for eid, e in now.items() if e["status"] in FINISHED} - done_before
            return bool(newly_done) and all(now[eid]["status"] in FINISHED for eid in unfinished)

        wait_for(progressed, 400, "new experiments to finish after the restart (and the interrupted ones)", diag)
        farm.signal(signal.SIGINT)
        assert farm.wait(timeout=90) == 0, diag()

        # ---- nothing lost, nothing run twice
        after = _experiments(db, program_id)
        assert set(before) <= set(after)
        for eid in done_before:
            assert after[eid]["status"] == before[eid]["status"], f"finished experiment {eid} changed"
        lost = [eid for eid, e in after.items() if e["status"] == "lost"]
        assert not lost, f"lost experiments: {lost}\n{diag()}"
        dup_results = _rows(db, "SELECT experiment_id, COUNT(*) FROM results GROUP BY experiment_id HAVING COUNT(*) > 1")
        assert not dup_results
        with_result = {r[0] for r in _rows(db, "SELECT experiment_id FROM results")}
        ran = {eid for eid, e in after.items() if e["status"] in ("succeeded", "crashed", "timed_out", "refused")}
        assert ran <= with_result, "an experiment finished without its one result"
        hashes = [e["hash"] for e in after.values()
                  if e["role"] == "candidate" and e["replicate_of"] is None and e["hash"]]
        assert len(hashes) == len(set(hashes)), "the same candidate was proposed and run twice"
        head_after = _rows(db, "SELECT head_commit FROM programs WHERE id = ?", program_id)[0][0]
        assert head_after, "the program has no branch head"
        if head_before:  # the branch moved on (or stayed); it never went back
            proc = subprocess.run(["git", "-C", str(home / "repo"), "merge-base", "--is-ancestor", head_before,
                                   head_after], capture_output=True, text=True)
            assert proc.returncode == 0, f"head {head_before} is not an ancestor of {head_after}: {proc.stderr}"
    finally:
        farm.kill_tree()
