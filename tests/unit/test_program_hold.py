"""A paused or stopped program's runs (found by review: stopping a program only flipped its status, and its queued
runs were claimed and trained all the same; a person's candidate past max_experiments showed as queued forever):
a stop cancels what has not started, a pause holds it without taking the class's capacity, and finishing cancels
what is still proposed. On the embedded default (SQLite); the HTTP stop is in test_api_programs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from api.crud import move_program
from farm import migrate, states
from farm.db import session_scope
from farm.models import Experiment, ExperimentRole, ExperimentStatus, Program, ProgramStatus, Worker, utcnow
from farm.programs import create_program
from farm.recovery import reconcile_broker
from farm.settings import get_settings, reset_settings_cache
from scheduler.loop import Scheduler
from tests.factories import make_experiment, make_program, make_worker
from tests.toy_template import install

S = ExperimentStatus


@pytest.fixture
def db(farm_env: dict[str, str]) -> None:
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)


def _statuses(pid: int) -> list[str]:
    with session_scope() as s:
        return [st.value for st in s.execute(select(Experiment.status).where(Experiment.program_id == pid)
                                             .order_by(Experiment.id)).scalars()]


def test_a_stop_cancels_what_has_not_started_and_leaves_a_run_in_flight(db: None) -> None:
    with session_scope() as s:
        p = make_program(s)
        make_worker(s, "w1")
        for st in (S.proposed, S.queued, S.queued, S.running, S.succeeded):
            make_experiment(s, p, status=st, worker_id="w1" if st == S.running else None)
        pid = p.id
    with session_scope() as s:
        assert move_program(s, program_id=pid, action="stop")[0]
    assert _statuses(pid) == ["cancelled", "cancelled", "cancelled", "running", "succeeded"]
    with session_scope() as s:
        reasons = set(s.execute(select(Experiment.status_reason).where(Experiment.status == S.cancelled)).scalars())
        assert reasons == {"its program was stopped before it ran"}
        assert all(e.finished_at is not None for e in s.execute(
            select(Experiment).where(Experiment.status == S.cancelled)).scalars())


def test_a_paused_or_stopped_programs_queued_run_is_not_claimed_and_a_resumed_one_is(db: None) -> None:
    with session_scope() as s:
        p = make_program(s)
        make_worker(s, "w1")
        exp_id = make_experiment(s, p).id
        pid = p.id
    for action, claimable in (("pause", False), ("resume", True)):
        with session_scope() as s:
            move_program(s, program_id=pid, action=action)
        with session_scope() as s:
            assert states.claim(s, exp_id, "w1") is claimable
    assert _statuses(pid) == ["running"]
    with session_scope() as s:
        queued = make_experiment(s, s.get(Program, pid)).id
        s.execute(update(Program).where(Program.id == pid).values(status=ProgramStatus.stopped))
    with session_scope() as s:  # stopped some other way than the API (it cancels): still never claimed
        assert states.claim(s, queued, "w1") is False


def test_the_reconciler_leaves_a_paused_programs_runs_alone_until_it_is_resumed(db: None) -> None:
    with session_scope() as s:
        p = make_program(s)
        exp_id = make_experiment(s, p, queued_at=None).id  # queued long ago, no live message
        pid = p.id
        move_program(s, program_id=pid, action="pause")
    report = reconcile_broker(grace=0.0)
    assert report.queued == 0 and report.republished == []
    with session_scope() as s:
        move_program(s, program_id=pid, action="resume")
    assert reconcile_broker(grace=0.0).republished == [exp_id]


@pytest.fixture
def toy_farm(farm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    install(monkeypatch, tmp_path)
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    published: list[int] = []
    monkeypatch.setattr("scheduler.loop.publish_experiment", lambda i, *a, **kw: published.append(i))
    return published


def test_a_paused_programs_queued_runs_take_none_of_the_capacity(toy_farm: list[int],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_LOOKAHEAD", "1")
    reset_settings_cache()
    with session_scope() as s:
        held = create_program(s, name="held", instructions="# a", policy={"baseline_runs": 1}).id
        busy = create_program(s, name="busy", instructions="# b", policy={"baseline_runs": 1}).id
        make_worker(s, "w1")
        s.execute(update(Worker).values(last_heartbeat=utcnow()))
    sched = Scheduler()
    try:
        sched.tick()  # the roots are committed and the baselines queued
        with session_scope() as s:
            move_program(s, program_id=held, action="pause")
            prog = s.get(Program, held)
            assert prog is not None
            for _ in range(3):  # a paused program with a backlog
                make_experiment(s, prog, status=S.queued, role=ExperimentRole.candidate, parent_commit=prog.head_commit)
            s.execute(update(Experiment).where(Experiment.program_id == busy).values(status=S.succeeded))
        sched.tick()
        with session_scope() as s:
            fed = s.execute(select(Experiment).where(Experiment.program_id == busy,
                                                     Experiment.status.in_([S.queued, S.proposed]))).scalars().all()
        # one live slot and a lookahead of one: before, the paused backlog (3) filled the class and busy got nothing
        assert fed, _statuses(busy)
    finally:
        sched.close()


def test_finishing_cancels_a_candidate_still_proposed(toy_farm: list[int]) -> None:
    with session_scope() as s:
        pid = create_program(s, name="capped", instructions="# c", policy={"baseline_runs": 1},
                             stop_rules={"max_experiments": 1}, proposer={"kind": "manual"}).id
    sched = Scheduler()
    try:
        sched.tick()  # the baseline is queued: it is the one run the cap allows
        with session_scope() as s:
            prog = s.get(Program, pid)
            assert prog is not None and prog.head_commit
            # a person's candidate accepted by the API (201) once the cap was reached
            manual = make_experiment(s, prog, status=S.proposed, parent_commit=prog.head_commit,
                                     role=ExperimentRole.candidate).id
            s.execute(update(Experiment).where(Experiment.program_id == pid, Experiment.role == ExperimentRole.baseline)
                      .values(status=S.succeeded))
        sched.tick()
        sched.tick()
        with session_scope() as s:
            prog = s.get(Program, pid)
            exp: Any = s.get(Experiment, manual)
            assert prog is not None and prog.status == ProgramStatus.finished, prog.status_reason
            assert exp.status == S.cancelled
            assert exp.status_reason == "its program finished before it ran (reached max_experiments=1)"
    finally:
        sched.close()


def test_an_llm_program_without_a_model_is_paused_with_the_reason(toy_farm: list[int],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: {"kind": "llm"} with no FARM_LLM_MODEL stayed active, its calls failing every pass
    ("LLM Provider NOT provided") with nothing on the dashboard but a call count."""
    from farm.models import LLMCall

    monkeypatch.delenv("FARM_LLM_MODEL", raising=False)
    monkeypatch.setenv("FARM_LOOKAHEAD", "3")  # room for more than the baseline: the pass asks for a proposal
    reset_settings_cache()
    with session_scope() as s:
        pid = create_program(s, name="no model", instructions="# x", proposer={"kind": "llm"},
                             policy={"baseline_runs": 1}).id
    sched = Scheduler()
    try:
        sched.tick()
        sched.tick()
    finally:
        sched.close()
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert prog is not None and prog.status == ProgramStatus.paused
        assert prog.status_reason == (
            "paused by the scheduler: its proposer is an LLM but no model is set: give proposer.model in the "
            "program, or set FARM_LLM_MODEL for the scheduler, then resume it")
        assert s.execute(select(LLMCall)).first() is None
    assert _statuses(pid) == ["queued"]  # the baseline still runs: it needs no proposer


def _manual_program_started(name: str, policy: dict[str, Any]) -> tuple[int, Scheduler]:
    """A program only people propose to, a worker w1, and a scheduler that has run one pass (root, baseline)."""
    with session_scope() as s:
        pid = create_program(s, name=name, instructions="# x", policy=policy, proposer={"kind": "manual"}).id
        make_worker(s, "w1")
    sched = Scheduler()
    sched.tick()
    return pid, sched


def test_a_stopped_programs_run_that_comes_back_is_cancelled_and_no_confirmation_is_made(
        toy_farm: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review of the above: a stopped program's run handed back by its worker (or reaped) went back to
    queued for ever (no worker claims it, the reconciler skips it), and a candidate whose confirmation the stop
    cancelled got a new confirmation every pass that never ran, holding its verdict."""
    from farm.recovery import release_runs

    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    pid, sched = _manual_program_started("stopped", {"baseline_runs": 1})
    try:
        with session_scope() as s:
            prog = s.get(Program, pid)
            assert prog is not None and prog.head_commit
            base = s.execute(select(Experiment).where(Experiment.program_id == pid)).scalar_one()
            assert states.claim(s, base.id, "w1")
            assert states.record_result(s, base.id, "w1", S.succeeded, val_bpb=1.0, hw_class="cpu")
            cand = make_experiment(s, prog, status=S.queued, role=ExperimentRole.candidate,
                                   parent_commit=prog.head_commit, commit_sha="ab" * 20, seed=7)
            other = make_experiment(s, prog, status=S.queued, role=ExperimentRole.candidate,
                                    parent_commit=prog.head_commit, commit_sha="cd" * 20, seed=8)
            assert states.claim(s, cand.id, "w1") and states.claim(s, other.id, "w1")
            assert states.record_result(s, cand.id, "w1", S.succeeded, val_bpb=0.95, hw_class="cpu")
            cand_id, other_id = cand.id, other.id
        sched.tick()  # 0.95 against 1.0: a confirmation is asked for
        with session_scope() as s:
            (conf,) = s.execute(select(Experiment).where(Experiment.replicate_of == cand_id)).scalars()
            assert conf.status in (S.proposed, S.queued)
            assert move_program(s, program_id=pid, action="stop")[0]
        assert release_runs({"w1"}, reason="its worker was shut down") == [other_id]  # handed back: queued
        for _ in range(3):
            sched.tick()
        with session_scope() as s:
            rows = {e.id: e for e in s.execute(select(Experiment).where(Experiment.program_id == pid)).scalars()}
            assert rows[other_id].status == S.cancelled
            assert [e.status for e in rows.values() if e.replicate_of == cand_id] == [S.cancelled]  # no new one
            assert rows[cand_id].decision is None  # unconfirmed, and left so
    finally:
        sched.close()


def test_a_stopped_program_makes_no_replay(toy_farm: list[int]) -> None:
    """A kept-worthy candidate of a stopped program whose parent is no longer the head: a replay would be a run
    that never runs (cancelled each pass); it stays undecided instead."""
    pid, sched = _manual_program_started("replayless", {"kind": "greedy", "baseline_runs": 1})
    try:
        with session_scope() as s:
            prog = s.get(Program, pid)
            assert prog is not None and prog.head_commit
            rows = [(ExperimentRole.baseline, prog.head_commit, prog.head_commit, 1.0),
                    (ExperimentRole.candidate, prog.head_commit, "ef" * 20, 0.99),  # a sibling's parent, never head
                    (ExperimentRole.candidate, "ef" * 20, "ab" * 20, 0.90)]
            base = s.execute(select(Experiment).where(Experiment.program_id == pid)).scalar_one()
            ids = [base.id]
            for role, parent, sha, _ in rows[1:]:
                ids.append(make_experiment(s, prog, status=S.queued, role=role, parent_commit=parent,
                                           commit_sha=sha).id)
            for i, (*_, val) in zip(ids, rows, strict=True):
                assert states.claim(s, i, "w1")
                assert states.record_result(s, i, "w1", S.succeeded, val_bpb=val, hw_class="cpu")
            s.execute(update(Experiment).where(Experiment.id == ids[1]).values(decision="discard"))
            assert move_program(s, program_id=pid, action="stop")[0]
        sched.tick()
        sched.tick()
        with session_scope() as s:
            assert s.get(Experiment, ids[2]).decision is None  # type: ignore[union-attr]
            assert not s.execute(select(Experiment).where(Experiment.program_id == pid,
                                                          Experiment.proposer_kind == "replay")).first()
    finally:
        sched.close()
