"""The CLI against a live API: submit, status, leaderboard, token create; errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def farm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "160", **env}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def test_submit_status_leaderboard(live_api, tmp_path):
    md = tmp_path / "program.md"
    md.write_text("# Batch size study\nFind the best batch size.\n")
    env = {"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token}
    r = farm("submit", str(md), "--policy", '{"k_sigma": 3}', "--stop-rules", '{"max_experiments": 10}', **env)
    assert r.returncode == 0, r.stderr
    assert "batch-size-study" in r.stdout
    with live_api.session() as s:
        from farm.models import Program

        p = s.query(Program).one()
        assert p.policy["k_sigma"] == 3 and p.stop_rules == {"max_experiments": 10}
    r = farm("status", **env)
    assert r.returncode == 0 and "batch-size-study" in r.stdout and "workers" in r.stdout
    r = farm("leaderboard", "batch-size-study", **env)
    assert r.returncode == 0 and "0 measured runs" in r.stdout


def test_errors_are_one_line(live_api, tmp_path):
    md = tmp_path / "p.md"
    md.write_text("x")
    cases = [
        ({"FARM_API_URL": "http://127.0.0.1:1", "FARM_API_TOKEN": "x"}, ["status"], "cannot reach the API"),
        ({"FARM_API_URL": live_api.url, "FARM_API_TOKEN": "rf_wrong"}, ["status"], "401 unauthorized"),
        ({"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token},
         ["submit", str(md), "--profile", "tpu"], "422"),
        ({"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token}, ["leaderboard", "nope"],
         "no program 'nope'"),
        ({"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token},
         ["submit", str(md), "--policy", "{bad"], "--policy is not valid JSON"),
    ]
    for env, args, needle in cases:
        r = farm(*args, **env)
        assert r.returncode != 0, args
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = farm("submit", str(md), "--profile", "tpu", FARM_API_URL=live_api.url, FARM_API_TOKEN=live_api.token)
    assert "body.profile" in r.stderr


def test_token_create_shows_once_and_works(live_api):
    r = farm("token", "create", "alice")
    assert r.returncode == 0, r.stderr
    plain = r.stdout.strip()
    assert plain.startswith("rf_") and "shown only now" in r.stderr
    assert live_api.client(token=plain).get("/programs").status_code == 200
    r = farm("token", "create", "alice")
    assert r.returncode != 0 and "already exists" in r.stderr
    r = farm("token", "list")
    assert "alice" in r.stdout and plain not in r.stdout


def test_leaderboard_and_status_print_brackets_as_text(live_api):
    # names, descriptions and worker ids are user or LLM text: rich markup in them must print as typed
    from farm.models import ExperimentStatus, Program, Result
    from tests.factories import make_experiment, make_worker

    c = live_api.client()
    pid = c.post("/programs", json={"name": "lr [/2] [bold]study", "instructions": "x"}).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        e = make_experiment(s, p, status=ExperimentStatus.succeeded, description="scale logits[i] by [/ 2]")
        s.add(Result(experiment_id=e.id, outcome=ExperimentStatus.succeeded, val_bpb=1.0))
        running = make_experiment(s, p, status=ExperimentStatus.running, description="try [red]x[/red]")
        w = make_worker(s, "host[1]")
        w.current_experiment_id = running.id
    env = {"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token}
    r = farm("leaderboard", str(pid), **env)
    assert r.returncode == 0, r.stderr[-400:]
    assert "lr [/2] [bold]study" in r.stdout and "scale logits[i] by [/ 2]" in r.stdout, r.stdout
    r = farm("status", **env)
    assert r.returncode == 0, r.stderr[-400:]
    assert "host[1]" in r.stdout and "try [red]x[/red]" in r.stdout, r.stdout


def test_revoking_farm_ups_token_removes_the_file_the_cli_reads(live_api):
    """Found by review: after `farm token revoke farm-up` the CLI still read FARM_HOME/api-token and answered only
    "401 unauthorized", with no word of where the token came from."""
    from farm.settings import get_settings

    saved = get_settings().home / "api-token"
    plain = farm("token", "create", "farm-up").stdout.strip()
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(plain + "\n")
    env = {"FARM_API_URL": live_api.url, "FARM_API_TOKEN": ""}
    assert farm("status", **env).returncode == 0  # the CLI finds farm up's token in the farm home
    r = farm("token", "revoke", "farm-up")
    assert r.returncode == 0 and "revoked" in r.stdout and str(saved) in r.stdout, r.stdout
    assert not saved.exists()
    saved.write_text(plain + "\n")  # a copy restored by hand, say
    r = farm("status", **env)
    assert r.returncode == 1 and f"it refused the token in {saved}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_leaderboard_of_a_reference_that_is_not_a_path(live_api):
    """Found by review: `farm leaderboard '1?x=1'` (or `'1#x'`) was pasted into the URL as typed and read program 1's
    answer as the page (KeyError); `farm leaderboard a/b` printed a bare 404."""
    c = live_api.client()
    assert c.post("/programs", json={"name": "one", "instructions": "x"}).json()["id"] == 1
    env = {"FARM_API_URL": live_api.url, "FARM_API_TOKEN": live_api.token}
    for ref in ("1?x=1", "1#x", "a/b", "..", "1/../1"):
        r = farm("leaderboard", ref, **env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (ref, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"farm: error: no program {ref!r}: give its id or slug (`farm status` lists them)"], r.stderr
    r = farm("leaderboard", "1", **env)
    assert r.returncode == 0 and "one (one): 0 measured runs" in r.stdout, r.stderr
