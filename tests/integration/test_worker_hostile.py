"""Hostile candidates, each contained with the right status while one real worker lives on.

One worker (Postgres + Redis, bubblewrap sandbox) runs them all in a row; each test then checks one
candidate's outcome. The worker's own environment carries fake credentials to look for.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.broker import make_celery, publish_experiment
from farm.db import dispose_engines, session_scope
from farm.models import Experiment, ExperimentStatus, Result
from farm.settings import reset_settings_cache
from tests.conftest import _drop_db, _fresh_db, _need
from tests.factories import make_experiment, make_program
from tests.workerkit import FAKE_TRAIN, FINISHED, rows, wait_status, worker_env, workers

S = ExperimentStatus
MARKER = f"farm-orphan-{uuid.uuid4().hex[:8]}"
SECRET = "sk-hostile-test-secret-0123456789"

FINISH = "import prepare\nprepare.finish(1.25, steps=3)\n"

CANDIDATES: dict[str, str] = {
    "loops_forever": "import prepare\nwhile True:\n    pass\n",
    "eats_memory": "import prepare\nx = []\nwhile True:\n    x.append(bytearray(b'\\1') * (32 << 20))\n",
    "forks_orphans": f"""import os, subprocess, sys, time
import prepare
for _ in range(3):
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{MARKER}'],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', '{MARKER}'])
time.sleep(0.5)
prepare.finish(1.25, steps=3)
""",
    "reads_environ": """import os, sys
import prepare
found = [k for k, v in os.environ.items()
         if 'secret' in v.lower() or 'postgres' in v.lower() or 'redis' in v.lower()
         or k.startswith(('FARM_DATABASE', 'FARM_BROKER', 'FARM_LLM', 'OPENAI', 'FARM_TEST'))]
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            env = open(f'/proc/{pid}/environ', 'rb').read()
        except OSError:
            continue
        if b'secret' in env.lower() or b'postgres' in env:
            found.append(f'/proc/{pid}/environ')
if found:
    print('FOUND', found)
    sys.exit(7)
prepare.finish(1.25, steps=3)
""",
    "reaches_services": """import os, socket, sys
import prepare
reached = []
for port in (PG_PORT, REDIS_PORT):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(('127.0.0.1', port))
        reached.append(port)
    except OSError:
        pass
home = 'FARM_HOME_PATH'
try:
    if os.listdir(home) != [] and set(os.listdir(home)) - {'work', 'data', 'cache'}:
        reached.append('home listing: %s' % os.listdir(home))
    open(os.path.join(home, 'pwned'), 'w').write('x')
except OSError:
    pass
if reached:
    print('REACHED', reached)
    sys.exit(7)
prepare.finish(1.25, steps=3)
""",
    "rewrites_prepare": """import os
try:
    open('prepare.py', 'w').write('print(1)')
except OSError as e:
    print('write failed', e)
try:
    open('evil.py', 'w').write('x = 1')
    os.replace('evil.py', 'prepare.py')
except OSError as e:
    print('replace failed', e)
print('---')
print('val_bpb:          0.100000')
""",
    "forged_line_then_real_result": """import prepare
print('---')
print('val_bpb:          0.000100')
prepare.finish(1.25, steps=3)
""",
    "forged_result_file": """import json, os
json.dump({'status': 'ok', 'val_bpb': 0.1, 'nonce': 'ab', 'digest': 'cd'}, open(os.environ['FARM_RESULT_PATH'], 'w'))
print('---')
print('val_bpb:          0.100000')
""",
    # signs a number json.loads takes and float() cannot: judging it raised, nothing was recorded, and the run was
    # re-queued until `lost` (found by review)
    "signs_a_huge_number": """import prepare
write = prepare._write_result
prepare._write_result = lambda result: write({**result, 'num_params_m': 10 ** 400, 'depth': 2 ** 70})
prepare.finish(1.25, steps=3)
""",
    "syntax_error": "import prepare\ndef broken(:\n    pass\n",
    "raises": "import prepare\nraise ValueError('learning rate must be positive')\n",
    "floods_stdout": """import sys
import prepare
line = 'x' * 1023 + '\\n'
for _ in range(60_000):
    sys.stdout.write(line)
prepare.finish(1.25, steps=3)
""",
}


@pytest.fixture(scope="module")
def hostile(pg_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    db = _fresh_db(pg_template)
    pg_url = _need("FARM_TEST_PG_URL").rsplit("/", 1)[0] + "/" + db
    redis_url = _need("FARM_TEST_REDIS_URL").rsplit("/", 1)[0] + "/3"
    home = tmp_path_factory.mktemp("hostile") / "home"
    home.mkdir()
    base = {"FARM_HOME": str(home), "FARM_DATABASE_URL": pg_url, "FARM_BROKER_URL": redis_url,
            "FARM_ENV": "development"}
    mp = pytest.MonkeyPatch()
    for k in list(os.environ):
        if k.startswith("FARM_") and not k.startswith("FARM_TEST_"):
            mp.delenv(k)
    for k, v in base.items():
        mp.setenv(k, v)
    reset_settings_cache()
    dispose_engines()
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    try:
        ids: dict[str, int] = {}
        with session_scope() as s:
            prog = make_program(s, time_budget=2.0)
            for i, (name, src) in enumerate(CANDIDATES.items()):
                src = (src.replace("PG_PORT", _need("FARM_TEST_PG_PORT"))
                       .replace("REDIS_PORT", _need("FARM_TEST_REDIS_PORT"))
                       .replace("FARM_HOME_PATH", str(home)))
                ids[name] = make_experiment(s, prog, files={"train.py": src}, content_hash=f"h{i}").id
            # ships a changed harness file: refused before anything runs
            ids["ships_prepare"] = make_experiment(s, prog, content_hash="hp", files={
                "train.py": FAKE_TRAIN, "prepare.py": "def finish(*a, **k): pass\n"}).id
        app = make_celery()
        for exp_id in ids.values():
            publish_experiment(exp_id, "cpu", time_limit=10, app=app)
        env = worker_env(base, FARM_LLM_API_KEY=SECRET, OPENAI_API_KEY=SECRET)
        logs = home.parent / "logs"
        with workers(env, ["hostile:cpu0"], logs) as (proc,):
            statuses = wait_status(ids.values(), FINISHED, timeout=150)
            alive = proc.poll() is None
        results = {r.experiment_id: r for r in rows(Result)}
        exps = {e.id: e for e in rows(Experiment)}
        yield {"ids": ids, "statuses": statuses, "results": results, "exps": exps, "alive": alive,
               "home": home}
    finally:
        mp.undo()
        reset_settings_cache()
        _drop_db(db)


def _get(h: dict[str, Any], name: str) -> tuple[Experiment, Result]:
    exp_id = h["ids"][name]
    return h["exps"][exp_id], h["results"][exp_id]


def test_worker_survives_every_candidate(hostile):
    assert hostile["alive"]
    assert len(hostile["results"]) == len(hostile["ids"])  # one result each


def test_infinite_loop_is_killed_at_the_limit(hostile):
    exp, res = _get(hostile, "loops_forever")
    assert exp.status == S.timed_out and "wall-clock limit" in (res.reason or "")
    assert 3.5 <= res.timings["child_seconds"] < 8  # budget 2 + allowances 1 + 1


def test_unbounded_memory_is_stopped_as_oom(hostile):
    exp, res = _get(hostile, "eats_memory")
    assert exp.status == S.crashed and "out of memory" in (res.reason or "").lower(), res.reason


def test_forked_children_are_all_killed(hostile):
    exp, res = _get(hostile, "forks_orphans")
    assert exp.status == S.succeeded, res.reason
    left = subprocess.run(["pgrep", "-f", MARKER], capture_output=True, text=True).stdout.split()
    assert left == [], f"orphans outlived the run: {left}"


def test_environment_holds_no_credentials(hostile):
    exp, res = _get(hostile, "reads_environ")
    assert exp.status == S.succeeded, res.log_tail


def test_database_broker_and_farm_home_are_out_of_reach(hostile):
    exp, res = _get(hostile, "reaches_services")
    assert exp.status == S.succeeded, res.log_tail
    assert not (Path(hostile["home"]) / "pwned").exists()


def test_rewriting_the_harness_and_printing_a_summary_is_refused(hostile):
    exp, res = _get(hostile, "rewrites_prepare")
    assert exp.status == S.refused and res.val_bpb is None
    assert "failed" in res.log_tail  # the harness was read-only inside the sandbox


def test_a_forged_val_bpb_line_before_the_real_summary_is_ignored(hostile):
    exp, res = _get(hostile, "forged_line_then_real_result")
    assert exp.status == S.succeeded and res.val_bpb == 1.25


def test_a_forged_result_file_is_refused(hostile):
    exp, res = _get(hostile, "forged_result_file")
    assert exp.status == S.refused and "forged" in (res.reason or "") and res.val_bpb is None


def test_a_signed_number_too_large_for_any_column_is_refused_not_lost(hostile):
    exp, res = _get(hostile, "signs_a_huge_number")
    assert exp.status == S.refused and "out of range" in (res.reason or "") and exp.retry_count == 0, res.reason


def test_a_changed_harness_file_in_the_candidate_is_refused_before_running(hostile):
    exp, res = _get(hostile, "ships_prepare")
    assert exp.status == S.refused and "prepare.py" in (res.reason or "")
    assert "child_seconds" not in res.timings


def test_syntax_error_is_a_crash_with_its_reason(hostile):
    exp, res = _get(hostile, "syntax_error")
    assert exp.status == S.crashed and (res.reason or "").startswith("SyntaxError"), res.reason
    assert res.exit_code == 1


def test_exception_reason_is_the_tracebacks_last_line(hostile):
    exp, res = _get(hostile, "raises")
    assert exp.status == S.crashed and res.reason == "ValueError: learning rate must be positive"


def test_flooded_stdout_is_capped_and_the_run_still_counts(hostile):
    exp, res = _get(hostile, "floods_stdout")
    assert exp.status == S.succeeded, res.reason
    assert res.timings["log_truncated"] and res.timings["log_bytes"] <= 1 << 20
    log = Path(hostile["home"]) / "logs" / f"experiment-{exp.id}-r0.log"
    assert log.stat().st_size < (1 << 20) + 4096
