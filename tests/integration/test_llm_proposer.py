"""LLM proposals through litellm against a scripted OpenAI-compatible server on loopback, and the
whole scheduler driven by it: every answer ends as a queued candidate or an invalid proposal with a
reason; retries, timeouts, accounting, history in the prompt, repairs and the spend cap."""

from __future__ import annotations

from collections import defaultdict

import pytest
from sqlalchemy import select

from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, LLMCall, Program, ProgramStatus
from farm.programs import create_program
from farm.settings import get_settings
from farm.states import claim, record_result
from scheduler.llm import LLMConfig, LLMProposer, parse_answer
from scheduler.loop import Scheduler
from scheduler.proposers import ProposalContext, ProposerError
from tests.factories import make_worker
from tests.llm_server import ScriptedLLM
from tests.toy_template import TRAIN, install

GOOD = """DESCRIPTION: raise the matrix learning rate
RATIONALE: a short budget rewards faster progress.
EDITS:
train.py
<<<<<<< SEARCH
MATRIX_LR = pick(h100=0.04, cpu=0.02)  # Muon learning rate
=======
MATRIX_LR = pick(h100=0.04, cpu=0.03)  # Muon learning rate
>>>>>>> REPLACE
"""
MALFORMED = "DESCRIPTION: broken block\nEDITS:\ntrain.py\n<<<<<<< SEARCH\nDEPTH = 1\n>>>>>>> REPLACE\n"
PARTIAL = GOOD[: GOOD.index("=======") + 20]
WHOLE = ("DESCRIPTION: deeper model\nRATIONALE: more capacity.\nFILE: train.py\n```python\n"
         + TRAIN.replace("cpu=2)", "cpu=3)") + "```\n")
MISSING = GOOD.replace("MATRIX_LR = pick(h100=0.04, cpu=0.02)", "MATRIX_LR = 0.5", 1)


def _ctx() -> ProposalContext:
    return ProposalContext(program_id=1, slug="p", profile="cpu", instructions="# go", head_commit="a" * 40,
                           head_files={"train.py": TRAIN}, editable=["train.py"])


def _cfg(base: str, **kw: object) -> LLMConfig:
    values: dict[str, object] = dict(model="openai/scripted", api_base=base, api_key="k", temperature=0.0,
                                     max_tokens=256, timeout=5.0, max_attempts=3, backoff=0.01)
    values.update(kw)
    return LLMConfig(**values)  # type: ignore[arg-type]


def test_parse_answer_formats():
    p = parse_answer(GOOD, ["train.py"], {"train.py": TRAIN})
    assert p.description == "raise the matrix learning rate" and "faster progress" in p.rationale
    assert p.edit.search_replace and p.edit.search_replace.startswith("train.py\n<<<<<<< SEARCH")
    w = parse_answer(WHOLE, ["train.py"], {"train.py": TRAIN})
    assert w.edit.files["train.py"].count("cpu=3)") == 1
    e = parse_answer("", ["train.py"], {"train.py": TRAIN})
    assert e.description == "(no description)" and not (e.edit.files or e.edit.search_replace)
    big = parse_answer("x" * 2_000_000, ["train.py"], {"train.py": TRAIN})
    assert len(big.raw) == 2_000_000 and len(big.description) <= 200


def test_retry_on_429_and_timeout_then_give_up():
    calls = []
    with ScriptedLLM([{"status": 429}, {"content": GOOD}]) as srv:
        prop = LLMProposer(_cfg(srv.base), record_call=lambda r: calls.append(r) or len(calls))
        p = prop.propose(_ctx())
        assert p.edit.search_replace and p.llm_call_ids == [1, 2]
        assert calls[0].error and "RateLimit" in calls[0].error and calls[1].error is None
        assert calls[1].prompt_tokens == 11 and calls[1].completion_tokens > 0 and calls[1].cost_usd == 0.0
        assert srv.requests[0]["messages"][0]["role"] == "system"
        calls.clear()
        srv.set_script([{"delay": 3.0, "content": GOOD}])
        slow = LLMProposer(_cfg(srv.base, timeout=0.5, max_attempts=2))
        slow.record_call = lambda r: calls.append(r) or len(calls)
        with pytest.raises(ProposerError):
            slow.propose(_ctx())
        assert len(calls) == 2 and all(c.error for c in calls) and all(c.latency_s < 3.0 for c in calls)
        calls.clear()
        srv.set_script([{"raw": "this is not json"}])
        with pytest.raises(ProposerError):
            LLMProposer(_cfg(srv.base, max_attempts=1), record_call=lambda r: calls.append(r) or 1).propose(_ctx())
        assert calls and calls[0].error


def _finish_queued(val: float, crash_log: str | None = None) -> None:
    with session_scope() as s:
        for e in s.execute(select(Experiment).where(Experiment.status == ExperimentStatus.queued)).scalars():
            assert claim(s, e.id, "w1")
            if crash_log and e.role.value != "baseline":
                record_result(s, e.id, "w1", ExperimentStatus.crashed, reason="exit code 1", log_tail=crash_log,
                              hw_class="cpu")
            else:
                record_result(s, e.id, "w1", ExperimentStatus.succeeded, hw_class="cpu",
                              val_bpb=1.0 if e.role.value == "baseline" else val)


def test_scheduler_with_scripted_llm_every_answer_ends_queued_or_invalid(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    script = [{"content": GOOD}, {"content": MALFORMED}, {"content": PARTIAL, "finish_reason": "length"},
              {"content": ""}, {"content": "DESCRIPTION: huge\n" + "y = 1\n" * 120_000}, {"content": MISSING},
              {"content": WHOLE}]
    with ScriptedLLM(script) as srv:
        with session_scope() as s:
            create_program(s, name="llm", instructions="# lower val_bpb", proposer={
                "kind": "llm", "model": "openai/scripted", "api_base": srv.base, "api_key": "k",
                "max_attempts": 2, "backoff": 0.01}, policy={"baseline_runs": 1})
            for w in ("w1", "w2", "w3"):
                make_worker(s, w)
        sched = Scheduler(publish=lambda *a, **k: None)
        try:
            for _ in range(12):
                sched.tick()
                sched.wait_for_proposals(120)
                _finish_queued(1.0)
                if len(srv.requests) >= len(script):
                    break
            sched.wait_for_proposals(120)
            _passes(sched, 1)
        finally:
            sched.close()
        with session_scope() as s:
            exps = s.execute(select(Experiment).where(Experiment.proposer_kind == "llm")
                             .order_by(Experiment.id)).scalars().all()
            calls = s.execute(select(LLMCall)).scalars().all()
            assert len(exps) >= len(script)
            for e in exps:
                assert e.status != ExperimentStatus.proposed or e.id >= exps[-2].id  # the last answers
                if e.status == ExperimentStatus.invalid:
                    assert e.status_reason
            reasons = {e.description: e.status_reason for e in exps if e.status == ExperimentStatus.invalid}
            assert any("malformed" in (r or "") or "no SEARCH" in (r or "") for r in reasons.values())
            assert any("not found" in (r or "") for r in reasons.values())
            assert any("no edit" in (r or "") for r in reasons.values())
            assert {e.description for e in exps if e.status != ExperimentStatus.invalid} >= {
                "raise the matrix learning rate", "deeper model"}
            assert all(c.experiment_id is not None for c in calls if c.error is None)
            assert all(c.prompt_tokens == 11 for c in calls if c.error is None)
        # the history in later prompts shows earlier invalid proposals with their reasons
        last_prompt = srv.requests[-1]["messages"][1]["content"]
        assert "[invalid]" in last_prompt and "not found" in last_prompt


TRACE = 'Traceback (most recent call last):\n  File "train.py", line 9\nNameError: name \'DEPHT\' is not defined'


def _queue_a_candidate(srv: ScriptedLLM, **stop_rules: float) -> tuple[int, Scheduler]:
    """A program allowing two repairs, its baseline finished and its first candidate queued."""
    with session_scope() as s:
        pid = create_program(s, name="rep", instructions="# go", proposer={
            "kind": "llm", "model": "openai/scripted", "api_base": srv.base, "api_key": "k"},
            policy={"baseline_runs": 1, "max_repairs": 2}, stop_rules=stop_rules or None).id
        make_worker(s, "w1")
    sched = Scheduler(publish=lambda *a, **k: None)
    sched.tick()
    _finish_queued(1.0)  # baseline
    sched.tick()
    sched.wait_for_proposals(120)
    sched.tick()  # the candidate is queued
    return pid, sched


def _passes(sched: Scheduler, n: int) -> None:
    """`n` scheduler passes, each waiting for the LLM calls it started; then the answers that arrived after the last
    pass get their rows."""
    for _ in range(n):
        sched.tick()
        sched.wait_for_proposals(120)
    sched._collect(defaultdict(int))


def _repairs_answered(srv: ScriptedLLM, answer: str) -> tuple[Experiment, list[Experiment]]:
    """A candidate queued, crashed with TRACE, and the passes that ask for its repair, answered with `answer`:
    the crashed experiment and its repairs (detached rows)."""
    _, sched = _queue_a_candidate(srv)
    try:
        srv.set_script([{"content": answer}])
        _finish_queued(1.0, crash_log=TRACE)
        _passes(sched, 4)
    finally:
        sched.close()
    with session_scope() as s:
        crashed = s.execute(select(Experiment).where(Experiment.status == ExperimentStatus.crashed)).scalar_one()
        repairs = list(s.execute(select(Experiment).where(Experiment.repair_of == crashed.id)).scalars())
        s.expunge_all()
    return crashed, repairs


def test_repair_of_a_crash_sees_its_traceback(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    with ScriptedLLM([{"content": GOOD}]) as srv:
        crashed, repairs = _repairs_answered(srv, WHOLE)
        assert len(repairs) == 1 and repairs[0].proposer_kind == "repair"
        assert repairs[0].parent_commit == crashed.parent_commit
        assert "cpu=3)" in repairs[0].diff  # diff against the parent, not the crashed files
        repair_prompts = [r for r in srv.requests if "# Repair" in r["messages"][1]["content"]]
        assert repair_prompts and "NameError" in repair_prompts[0]["messages"][1]["content"]


def test_a_repair_that_also_edits_the_harness_is_refused_like_any_proposal(pg_env, tmp_path, monkeypatch):
    """Found by review: a repair answer with FILE: prepare.py beside FILE: train.py was stored proposed with prepare.py
    silently dropped (the repair path kept the editable files of what it applied), while the same answer as a normal
    proposal is refused for touching a non-editable file. A repair is refused the same way now."""
    from tests.toy_template import PREPARE

    install(monkeypatch, tmp_path)
    both = ("DESCRIPTION: fix it\nFILE: prepare.py\n```python\n" + PREPARE + "# mine now\n```\n"
            "FILE: train.py\n```python\n" + TRAIN.replace("cpu=2)", "cpu=3)") + "```\n")
    with ScriptedLLM([{"content": GOOD}]) as srv:
        _, repairs = _repairs_answered(srv, both)
        assert repairs and all(r.status == ExperimentStatus.invalid for r in repairs)
        assert all("non-editable file(s): prepare.py" in (r.status_reason or "") for r in repairs)


def test_a_program_whose_calls_the_provider_keeps_refusing_is_paused_with_why(pg_env, tmp_path, monkeypatch):
    """Found by review: a bad key or a model the provider lacks failed every call, the program stayed active for ever
    (a call every few minutes, nothing on its page). Three refusals in a row (401, 403, 404) pause it with the
    reason; a failure another attempt may cure (a 503) counts nothing."""
    import scheduler.loop as loop

    install(monkeypatch, tmp_path)
    with ScriptedLLM([{"status": 401}]) as srv:
        with session_scope() as s:
            pid = create_program(s, name="badkey", instructions="# go", proposer={
                "kind": "llm", "model": "openai/scripted", "api_base": srv.base, "api_key": "wrong"},
                policy={"baseline_runs": 1}).id
            make_worker(s, "w1")
        sched = Scheduler(publish=lambda *a, **k: None)
        try:
            sched.tick()
            _finish_queued(1.0)  # the baseline
            for _ in range(loop.REFUSALS_TO_PAUSE + 1):
                sched.cooldown.clear()  # no waiting between tries here
                sched.tick()
                sched.wait_for_proposals(60)
            sched._collect(defaultdict(int))
            sched.tick()
        finally:
            sched.close()
        with session_scope() as s:
            prog = s.get(Program, pid)
            assert prog.status == ProgramStatus.paused, (prog.status, len(srv.requests))
            assert "refused 3 calls in a row" in (prog.status_reason or "") and "fix the proposer" in prog.status_reason
        assert len(srv.requests) == loop.REFUSALS_TO_PAUSE  # one request a call: a refusal is not retried


def test_spend_cap_stops_proposals_and_finishes(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    with ScriptedLLM([{"content": GOOD}]) as srv:
        with session_scope() as s:
            p = create_program(s, name="cap", instructions="# go", proposer={
                "kind": "llm", "model": "openai/scripted", "api_base": srv.base, "api_key": "k"},
                policy={"baseline_runs": 1}, stop_rules={"max_spend_usd": 0.5})
            s.add(LLMCall(program_id=p.id, model="openai/scripted", cost_usd=0.6))
            make_worker(s, "w1")
        sched = Scheduler(publish=lambda *a, **k: None)
        try:
            sched.tick()  # the baseline still runs (it measures the noise floor)
            _finish_queued(1.0)
            sched.tick()
            sched.tick()
        finally:
            sched.close()
        assert srv.requests == []
        with session_scope() as s:
            prog = s.execute(select(Program)).scalar_one()
            assert prog.status == ProgramStatus.finished and "spend" in (prog.status_reason or "")
    assert get_settings().lookahead >= 0


def test_spend_cap_stops_repairs(pg_env, tmp_path, monkeypatch):
    """A crash after the program reached its spend cap gets no repair call: the program takes no new
    work (its repair could not be queued), and a repair's LLM call is spend like any other."""
    install(monkeypatch, tmp_path)
    with ScriptedLLM([{"content": GOOD}]) as srv:
        pid, sched = _queue_a_candidate(srv, max_spend_usd=0.5)
        try:
            with session_scope() as s:  # the cap is reached while it runs
                s.add(LLMCall(program_id=pid, model="openai/scripted", cost_usd=0.6))
            srv.set_script([{"content": WHOLE}])
            _finish_queued(1.0, crash_log=TRACE)
            for _ in range(3):
                sched.tick()
                sched.wait_for_proposals(120)
        finally:
            sched.close()
        assert not [r for r in srv.requests if "# Repair" in r["messages"][1]["content"]]
        with session_scope() as s:
            prog = s.get(Program, pid)
            assert prog.status == ProgramStatus.finished and "spend" in (prog.status_reason or "")


def test_an_overloaded_provider_is_retried_and_a_refusal_is_not():
    """Found by review: 529 ("overloaded", Anthropic's) reached us as a plain APIError, which was not retried, so a
    moment of overload cost the proposal. A status worth another attempt is retried whatever class litellm gives it;
    a 401 still fails at once."""
    calls: list = []
    with ScriptedLLM([{"status": 529}, {"status": 503}, {"content": GOOD}]) as srv:
        p = LLMProposer(_cfg(srv.base), record_call=lambda r: calls.append(r) or len(calls)).propose(_ctx())
        assert p.edit.search_replace and len(calls) == 3 and calls[0].error and calls[2].error is None
        calls.clear()
        srv.set_script([{"status": 401}, {"content": GOOD}])
        with pytest.raises(ProposerError):
            LLMProposer(_cfg(srv.base), record_call=lambda r: calls.append(r) or len(calls)).propose(_ctx())
        assert len(calls) == 1


def test_a_nul_in_an_answer_is_dropped_before_it_is_stored():
    """Found by review: Postgres text holds no NUL, so an answer with one in its description failed the insert and
    its paid call was left linked to nothing (as a lone surrogate did)."""
    p = parse_answer(GOOD.replace("raise the matrix", "raise\x00 the matrix"), ["train.py"], {"train.py": TRAIN})
    assert p.description == "raise the matrix learning rate" and "\x00" not in p.raw
