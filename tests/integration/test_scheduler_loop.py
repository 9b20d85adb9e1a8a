"""The scheduler loop on a real database and git repository, with workers simulated through the
state machine (claim + record_result): feeding by capacity and weight, pause, confirmation, keep,
replay onto a moved head, manual patches, stop rules, and restarts that duplicate nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from farm.candidates import Edit, record_proposal
from farm.db import session_scope
from farm.lineage import Lineage
from farm.models import (
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentRole,
    ExperimentStatus,
    LLMCall,
    Program,
    ProgramStatus,
)
from farm.programs import create_program
from farm.settings import reset_settings_cache
from farm.states import claim, record_result
from scheduler.loop import Scheduler
from scheduler.proposers import ProposerError
from tests.factories import make_worker
from tests.toy_template import TRAIN, install

S = ExperimentStatus


def _sched(published: list[int] | None = None, *, propose: bool = True) -> Scheduler:
    return Scheduler(publish=lambda i, hw, **kw: (published if published is not None else []).append(i),
                     proposer_factory=None if propose else lambda program: _NoProposals())


class _NoProposals:
    """For tests that propose by hand: a mutation of the head could by chance equal what they expect a replay to
    be (the mutation proposer's seed includes the head's sha, which includes a commit time)."""
    kind = "manual"
    inline = True

    def propose(self, ctx: Any) -> Any:
        raise ProposerError("this test proposes by hand")


def finish(exp_id: int, val: float | None, worker: str = "w1") -> None:
    with session_scope() as s:
        assert claim(s, exp_id, worker)
        if val is None:
            assert record_result(s, exp_id, worker, S.crashed, reason="exit 1", log_tail="OOM", hw_class="cpu")
        else:
            assert record_result(s, exp_id, worker, S.succeeded, val_bpb=val, hw_class="cpu")


def queued() -> list[Experiment]:
    with session_scope() as s:
        return list(s.execute(select(Experiment).where(Experiment.status == S.queued)
                              .order_by(Experiment.id)).scalars())


def count(**where: object) -> int:
    with session_scope() as s:
        q = select(func.count()).select_from(Experiment)
        for k, v in where.items():
            q = q.where(getattr(Experiment, k) == v)
        return int(s.execute(q).scalar_one())


def test_feeding_by_capacity_weight_pause_and_restart(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "1")
    reset_settings_cache()
    with session_scope() as s:
        a = create_program(s, name="heavy", instructions="# a", weight=3.0, policy={"baseline_runs": 2})
        b = create_program(s, name="light", instructions="# b", weight=1.0, policy={"baseline_runs": 2})
        for i in range(7):
            make_worker(s, f"w{i}")
        make_worker(s, "gpu0", hw_class="gpu.h100")  # another class: no cpu capacity
        ids = (a.id, b.id)
    published: list[int] = []
    sched = _sched(published)
    sched.tick()
    with session_scope() as s:
        per = dict(s.execute(select(Experiment.program_id, func.count()).where(Experiment.status == S.queued)
                             .group_by(Experiment.program_id)).all())
    assert sum(per.values()) == 8 == len(published)  # 7 live cpu workers + lookahead 1
    assert per[ids[0]] == 6 and per[ids[1]] == 2  # shared 3:1
    lin = Lineage(sched.settings.repo_dir)
    for e in queued():
        assert e.commit_sha and lin.has_commit(e.commit_sha)
        if e.role == ExperimentRole.candidate:
            assert lin.parents(e.commit_sha) == [e.parent_commit]
    sched.close()
    # a restarted scheduler with nothing finished adds nothing
    again = _sched(published)
    again.tick()
    assert len(published) == 8 and count(status=S.queued) == 8
    # pause the heavy program: its finished slots are not refilled, and its queued runs wait (no worker starts
    # them) without taking the class's capacity: the light one takes all of it
    done = queued()[:4]
    for e in done:
        finish(e.id, 1.0, worker=f"w{e.id % 7}")
    with session_scope() as s:
        s.get(Program, ids[0]).status = ProgramStatus.paused
    again.tick()

    def load(pid: int) -> int:
        with session_scope() as s:
            return s.execute(select(func.count()).select_from(Experiment).where(
                Experiment.program_id == pid, Experiment.status.in_([S.queued, S.running]))).scalar_one()

    assert load(ids[0]) == 6 - sum(e.program_id == ids[0] for e in done)
    assert load(ids[1]) == 8
    again.close()


def test_confirm_keep_replay_and_manual_patch(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        p = create_program(s, name="judge", instructions="# go", policy={"baseline_runs": 2, "k_sigma": 2.0})
        make_worker(s, "w1")
        pid = p.id
    sched = _sched(propose=False)
    sched.tick()
    (b1,) = queued()
    assert b1.role == ExperimentRole.baseline
    finish(b1.id, 1.0)
    sched.tick()
    (b2,) = queued()
    finish(b2.id, 1.0)
    # two manual patches against the template head, touching different lines
    with session_scope() as s:
        prog = s.get(Program, pid)
        root = prog.root_commit
        base = {"train.py": TRAIN}
        ea = record_proposal(s, prog, parent_commit=root, base_files=base, proposer_kind="manual",
                             description="lr up", edit=Edit(files={"train.py": TRAIN.replace("cpu=0.02", "cpu=0.03")}))
        eb = record_proposal(s, prog, parent_commit=root, base_files=base, proposer_kind="manual",
                             description="warmdown", edit=Edit(files={"train.py": TRAIN.replace(
                                 "WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.7")}))
        a_id, b_id = ea.id, eb.id
        make_worker(s, "w2")
    sched.tick()
    assert {e.id for e in queued()} == {a_id, b_id}
    finish(a_id, 0.99)
    sched.tick()  # screening passes -> confirmation queued (b still running... queued here)
    conf = [e for e in queued() if e.replicate_of == a_id]
    assert len(conf) == 1 and conf[0].role == ExperimentRole.confirmation and conf[0].seed != 0
    with session_scope() as s:
        assert s.get(Experiment, a_id).commit_sha == conf[0].commit_sha
    finish(conf[0].id, 0.99, worker="w2")
    sched.tick()
    with session_scope() as s:
        prog = s.get(Program, pid)
        a = s.get(Experiment, a_id)
        assert a.decision == Decision.keep and prog.head_commit == a.commit_sha and prog.head_experiment_id == a_id
        rec = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == a_id)).scalar_one()
        assert rec.head_before == root and rec.head_after == a.commit_sha
        assert rec.statistics["runs"] == [0.99, 0.99] and rec.statistics["parent_mean"] == 1.0
        assert rec.statistics["margin"] > 0 and rec.statistics["sigma"] > 0
        assert s.get(Experiment, conf[0].id).decision == Decision.keep
    lin = Lineage(sched.settings.repo_dir)
    sched.flush_notes()  # notes are written off the pass, in order
    assert lin.branch_head("judge") == a.commit_sha and "Val-Bpb: 0.990000" in lin.note(a.commit_sha)
    # b improved on its (old) parent; the head has moved: replayed onto the head as a confirmation
    finish(b_id, 0.98, worker="w2")
    sched.tick()
    with session_scope() as s:
        b = s.get(Experiment, b_id)
        assert b.decision == Decision.discard
        rb = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == b_id)).scalar_one()
        assert "replay" in rb.statistics, rb.reason
        replay_id = rb.statistics["replay"]["experiment_id"]
        r = s.get(Experiment, replay_id)
        assert r.role == ExperimentRole.confirmation and r.proposer_kind == "replay"
        assert r.parent_commit == a.commit_sha and r.status == S.queued
        assert "cpu=0.03" in r.files["train.py"] and "WARMDOWN_RATIO = 0.7" in r.files["train.py"]
    assert lin.parents(r.commit_sha) == [a.commit_sha]
    finish(replay_id, 0.975)
    sched.tick()
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert prog.head_experiment_id == replay_id and s.get(Experiment, replay_id).decision == Decision.keep
    assert lin.branch_head("judge") == r.commit_sha and lin.is_ancestor(a.commit_sha, r.commit_sha)
    # a restart re-decides nothing
    n_dec = count(status=S.succeeded) - count(role=ExperimentRole.baseline)  # baselines get no decision
    sched.close()
    s2 = _sched()
    s2.tick()
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(DecisionRecord)).scalar_one() == n_dec
    s2.close()


def test_confirm_runs_zero_keeps_without_a_confirmation_run(pg_env, tmp_path, monkeypatch):
    """The cheap setting of docs/policy.md: a screening run past the margin is kept at once, no
    confirmation queued (judge used to ask for one whatever confirm_runs said)."""
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        pid = create_program(s, name="cheap", instructions="# go", policy={"baseline_runs": 2, "confirm_runs": 0}).id
        make_worker(s, "w1")
    sched = _sched(propose=False)
    for _ in range(2):
        sched.tick()
        (b,) = queued()
        finish(b.id, 1.0)
    with session_scope() as s:
        prog = s.get(Program, pid)
        c = record_proposal(s, prog, parent_commit=prog.root_commit, base_files={"train.py": TRAIN},
                            proposer_kind="manual", description="lr up",
                            edit=Edit(files={"train.py": TRAIN.replace("cpu=0.02", "cpu=0.03")}))
        c_id = c.id
    sched.tick()
    assert [e.id for e in queued()] == [c_id]
    finish(c_id, 0.98)  # 0.02 better than the baselines; the margin is 2 x sigma, about 0.003
    sched.tick()
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert s.get(Experiment, c_id).decision == Decision.keep and prog.head_experiment_id == c_id
    assert count(replicate_of=c_id) == 0
    sched.close()


def test_greedy_stop_rule_and_finish(pg_env, tmp_path, monkeypatch):
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        create_program(s, name="short", instructions="# go", policy={"kind": "greedy", "baseline_runs": 1},
                       stop_rules={"max_experiments": 4})
        make_worker(s, "w1")
    sched = _sched()
    vals = iter([1.0, 0.995, 1.01, None, 0.99, 0.98])
    for _ in range(10):
        sched.tick()
        for e in queued():
            finish(e.id, next(vals))
    with session_scope() as s:
        prog = s.execute(select(Program)).scalar_one()
        assert prog.status == ProgramStatus.finished and "max_experiments=4" in (prog.status_reason or "")
        exps = s.execute(select(Experiment).order_by(Experiment.id)).scalars().all()
        ran = [e for e in exps if e.status not in (S.proposed, S.invalid)]
        assert len(ran) == 4
        assert ran[0].role == ExperimentRole.baseline  # a measurement of the head: no decision
        assert [e.decision for e in ran] == [None, Decision.keep, Decision.discard, None]
        assert ran[3].status == S.crashed
        assert prog.head_experiment_id == ran[1].id
    sched.close()



def test_max_experiments_holds_within_one_pass(pg_env, tmp_path, monkeypatch):
    """Many free workers and a cap of 4: the pass that finds 6 pending proposals queues 2 (the
    baselines are the other 2); _exhausted was checked once per program per pass, and the rest of
    the pass queued on without looking again."""
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        pid = create_program(s, name="cap", instructions="# go", policy={"baseline_runs": 2},
                             stop_rules={"max_experiments": 4}).id
        for i in range(8):
            make_worker(s, f"w{i}")
    sched = _sched(propose=False)
    sched.tick()
    for e in queued():
        finish(e.id, 1.0, worker="w0")
    with session_scope() as s:
        prog = s.get(Program, pid)
        for i in range(6):
            record_proposal(s, prog, parent_commit=prog.root_commit, base_files={"train.py": TRAIN},
                            proposer_kind="manual", description=f"lr {i}",
                            edit=Edit(files={"train.py": TRAIN.replace("cpu=0.02", f"cpu=0.0{i + 3}")}))
    sched.tick()
    assert len(queued()) == 2 and count(status=S.proposed) == 4
    sched.close()


class _PooledProposer:
    """Answers on the scheduler's thread pool, as the LLM proposer does: one learning rate per seed."""
    kind = "llm"
    inline = False

    def propose(self, ctx: Any) -> Any:
        from scheduler.proposers import Proposal

        text = ctx.head_files["train.py"].replace("cpu=0.02", f"cpu=0.{ctx.seed + 30}")
        return Proposal(description=f"lr seed {ctx.seed}", rationale="", edit=Edit(files={"train.py": text}))


def _eight_free_workers(monkeypatch, tmp_path, **program: Any) -> Scheduler:  # type: ignore[no-untyped-def]
    """One program (two baselines, no lookahead) and eight idle workers; its proposer answers from a pool."""
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        create_program(s, instructions="# go", policy={"baseline_runs": 2}, **program)
        for i in range(8):
            make_worker(s, f"w{i}")
    return Scheduler(publish=lambda *a, **k: None, proposer_factory=lambda program: _PooledProposer())


def test_max_experiments_bounds_the_proposer_calls_of_a_pass(pg_env, tmp_path, monkeypatch):
    """The calls started from the pass's cached context count against the cap too: 8 free workers,
    2 baselines and max_experiments=4 start 2 calls, not 6 (whose answers could not all run)."""
    sched = _eight_free_workers(monkeypatch, tmp_path, name="capllm", stop_rules={"max_experiments": 4})
    first = sched.tick()
    assert first["queued"] == 2 and first["llm_calls_started"] == 2, first
    sched.wait_for_proposals()
    for e in queued():
        finish(e.id, 1.0, worker="w0")
    second = sched.tick()  # the answers are stored and queued; the cap is reached: no call
    assert second["queued"] == 2 and second.get("llm_calls_started", 0) == 0, second
    sched.close()


def test_max_in_flight_bounds_a_programs_runs_and_calls(pg_env, tmp_path, monkeypatch):
    """proposer.max_in_flight (accepted by the API, read nowhere before): 8 free workers, yet at most 3
    of the program's runs queued or running and proposer calls in flight at once."""
    sched = _eight_free_workers(monkeypatch, tmp_path, name="narrow", proposer={"kind": "llm", "max_in_flight": 3})
    first = sched.tick()
    assert first["queued"] == 2 and first["llm_calls_started"] == 1, first
    sched.wait_for_proposals()
    for e in queued():
        finish(e.id, 1.0, worker="w0")
    second = sched.tick()  # the answer is queued and two more calls start: 3 again
    assert second["queued"] == 1 and second["llm_calls_started"] == 2, second
    sched.wait_for_proposals()
    assert sched.tick().get("llm_calls_started", 0) == 0  # 3 runs queued: nothing more
    assert len(queued()) == 3
    sched.close()


def test_each_stop_rule_finishes_its_program(pg_env, tmp_path, monkeypatch):
    """target_val_bpb (after a keep), every baseline failing, a passed deadline, max_hours: each
    finishes the program once nothing of it is under way, with the rule as the reason."""
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    greedy = {"kind": "greedy", "baseline_runs": 1}
    with session_scope() as s:
        ids = {
            "target": create_program(s, name="target", instructions="# t", policy=greedy,
                                     stop_rules={"target_val_bpb": 0.99}).id,
            "baseline": create_program(s, name="baseline", instructions="# b", policy=greedy).id,
        }
        make_worker(s, "w1")
    sched = _sched()
    vals = {ids["target"]: iter([1.0, 0.98, 0.985, 0.97]), ids["baseline"]: iter([None, None])}
    for _ in range(8):
        sched.tick()
        for e in queued():
            finish(e.id, next(vals[e.program_id]))

    def status(pid: int) -> tuple[ProgramStatus, str]:
        with session_scope() as s:
            prog = s.get(Program, pid)
            return prog.status, prog.status_reason or ""

    assert status(ids["target"]) == (ProgramStatus.finished, "head val_bpb 0.980000 reached the target 0.99")
    assert status(ids["baseline"]) == (ProgramStatus.finished, "every baseline run failed: exit 1")
    with session_scope() as s:  # the baseline program ran its one baseline and nothing else
        assert s.execute(select(func.count()).select_from(Experiment).where(
            Experiment.program_id == ids["baseline"], Experiment.status != S.proposed)).scalar_one() == 1
        late = create_program(s, name="late", instructions="# l", policy=greedy,
                              stop_rules={"deadline": "2020-01-01T00:00:00+00:00"}).id
        old = create_program(s, name="old", instructions="# o", policy=greedy, stop_rules={"max_hours": 1})
        old.created_at = old.created_at.replace(year=old.created_at.year - 1)
        old_id = old.id
    sched.tick()
    assert status(late)[0] == ProgramStatus.finished and "deadline 2020-01-01" in status(late)[1]
    assert status(old_id) == (ProgramStatus.finished, "ran for max_hours=1")
    assert count(status=S.queued) == 0  # finished before anything was queued for them
    sched.close()


def test_a_stop_rule_out_of_datetimes_range_or_unreadable_does_not_stop_the_pass(pg_env, tmp_path, monkeypatch):
    """Found by review: a deadline the API took ("9999-12-31T23:00:00-12:00") overflowed when turned into UTC, in the
    stop phase, before the fill: every pass failed and no program got work. Rules stored like that (before the API
    refused them) now mean what they say at datetime's ends, and one that cannot be read at all is left unapplied,
    alone (the program's other rules still apply); a huge max_hours is no timedelta overflow either."""
    from sqlalchemy import update

    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    greedy = {"kind": "greedy", "baseline_runs": 1}
    rules = {"never": {"deadline": "9999-12-31T23:00:00-12:00", "max_hours": 1e300},
             "long_ago": {"deadline": "0001-01-01T00:00:00+01:00"}, "garbled": {"deadline": "next tuesday"},
             "garbled_capped": {"deadline": "next tuesday", "max_spend_usd": 0}, "plain": {}}
    with session_scope() as s:
        ids = {name: create_program(s, name=name, instructions=f"# {name}", policy=greedy).id for name in rules}
        for name, rule in rules.items():  # as an old row holds them: past any check create_program makes
            s.execute(update(Program).where(Program.id == ids[name]).values(stop_rules=rule))
        for w in ("w1", "w2", "w3"):
            make_worker(s, w)
    sched = _sched()
    try:
        sched.tick()
        sched.tick()
        with session_scope() as s:
            status = {name: s.get(Program, pid).status for name, pid in ids.items()}
        assert status == {"never": ProgramStatus.active, "long_ago": ProgramStatus.finished,
                          "garbled": ProgramStatus.active, "plain": ProgramStatus.active,
                          # the unreadable deadline switches off that rule alone: the spend cap still applies
                          "garbled_capped": ProgramStatus.finished}
        assert {e.program_id for e in queued()} == {ids["never"], ids["garbled"], ids["plain"]}  # their baselines
    finally:
        sched.close()


def _mutation_program(monkeypatch, tmp_path, name: str):  # type: ignore[no-untyped-def]
    """A started scheduler with one mutation program, and the proposal context of its head."""
    install(monkeypatch, tmp_path)
    with session_scope() as s:
        pid = create_program(s, name=name, instructions=f"# {name}", proposer={"kind": "mutation"}).id
    sched = _sched()
    sched.start()
    with session_scope() as s:
        ctx = sched._context(s, s.get(Program, pid), seed=0)
    return pid, sched, ctx


def test_answers_are_stored_together_and_survive_a_database_outage(pg_env, tmp_path, monkeypatch):
    """A pass stores its LLM answers in one transaction with a savepoint each: one answer that
    cannot be stored is skipped alone, and when the database is away the whole batch is kept for the
    next pass rather than thrown away (the answers cost LLM money)."""
    from collections import defaultdict
    from concurrent.futures import Future

    from sqlalchemy.exc import OperationalError

    import scheduler.loop as loop
    from scheduler.loop import Job
    from scheduler.proposers import Proposal

    pid, sched, ctx = _mutation_program(monkeypatch, tmp_path, "batch")

    made = [0]

    def answers(*descs: str) -> None:  # answered LLM calls, each a distinct valid edit
        for desc in descs:
            made[0] += 1
            text = TRAIN.replace("EMBEDDING_LR = 0.6", f"EMBEDDING_LR = 0.{made[0]}")
            fut: Future[Proposal] = Future()
            fut.set_result(Proposal(description=desc, rationale="", edit=Edit(files={"train.py": text})))
            sched.inflight[fut] = Job(pid, ctx)

    real = loop.record_proposal

    def flaky(session, program, **kw):
        if kw["description"] == "poison":
            raise RuntimeError("cannot store this one")
        if kw["description"] == "outage":
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real(session, program, **kw)

    monkeypatch.setattr(loop, "record_proposal", flaky)
    answers("first", "poison", "third")
    stats: defaultdict[str, int] = defaultdict(int)
    sched._collect(stats)
    assert stats["proposed"] == 2 and stats["record_errors"] == 1 and not sched.inflight
    assert sorted(e.description for e in queued_or_proposed()) == ["first", "third"]

    answers("fourth", "outage")
    try:
        sched._collect(stats)
        raise AssertionError("the outage must fail the pass")
    except OperationalError:
        pass
    assert [p.description for _, p in sched._unstored] == ["fourth", "outage"]
    assert sorted(e.description for e in queued_or_proposed()) == ["first", "third"]  # rolled back
    monkeypatch.setattr(loop, "record_proposal", lambda session, program, **kw: real(
        session, program, **{**kw, "description": kw["description"].replace("outage", "fifth")}))
    sched._collect(stats)  # the database is back: the kept answers are stored
    assert not sched._unstored
    assert sorted(e.description for e in queued_or_proposed()) == ["fifth", "first", "fourth", "third"]
    sched.close()


def test_a_batch_of_answers_finds_duplicates_among_itself_and_links_its_llm_calls(pg_env, tmp_path, monkeypatch):
    """The pass stores its answers with one INSERT: an edit equal to one already stored, or to another answer
    of the same batch, is invalid as a duplicate, and every answer's LLM calls point at its experiment."""
    from collections import defaultdict
    from concurrent.futures import Future

    from scheduler.loop import Job
    from scheduler.proposers import Proposal

    pid, sched, ctx = _mutation_program(monkeypatch, tmp_path, "dups")
    with session_scope() as s:
        calls = []
        for _ in range(4):
            c = LLMCall(program_id=pid, model="m", purpose="propose")
            s.add(c)
            s.flush()
            calls.append(c.id)

    def answer(desc: str, lr: str, call: int) -> None:
        fut: Future[Proposal] = Future()
        edit = Edit(files={"train.py": TRAIN.replace("EMBEDDING_LR = 0.6", f"EMBEDDING_LR = {lr}")})
        fut.set_result(Proposal(description=desc, rationale="", edit=edit, llm_call_ids=[call]))
        sched.inflight[fut] = Job(pid, ctx)

    answer("old", "0.11", calls[0])
    stats: defaultdict[str, int] = defaultdict(int)
    sched._collect(stats)
    answer("again", "0.11", calls[1])  # the same content as a stored experiment
    answer("new", "0.22", calls[2])
    answer("twin", "0.22", calls[3])  # the same content as another answer of this batch
    sched._collect(stats)
    assert stats["proposed"] == 2 and stats["invalid"] == 2 and stats["record_errors"] == 0
    with session_scope() as s:
        exps = {e.description: e for e in s.execute(select(Experiment).where(Experiment.program_id == pid)
                                                    .where(Experiment.proposer_kind != "baseline")).scalars()}
        assert exps["old"].status == ExperimentStatus.proposed and exps["new"].status == ExperimentStatus.proposed
        assert exps["again"].status == ExperimentStatus.invalid
        assert exps["again"].status_reason == f"duplicate of experiment {exps['old'].id}"
        assert exps["twin"].status == ExperimentStatus.invalid
        assert "duplicate" in (exps["twin"].status_reason or "")
        linked = dict(s.execute(select(LLMCall.id, LLMCall.experiment_id).where(LLMCall.id.in_(calls))).all())
    assert linked == {calls[0]: exps["old"].id, calls[1]: exps["again"].id, calls[2]: exps["new"].id,
                      calls[3]: exps["twin"].id}
    sched.close()


def queued_or_proposed() -> list[Experiment]:
    with session_scope() as s:
        return list(s.execute(select(Experiment).where(Experiment.status.in_([S.queued, S.proposed]),
                                                       Experiment.role == ExperimentRole.candidate)).scalars())


def test_proposal_context_matches_the_program_as_loaded(pg_env, tmp_path, monkeypatch):
    """The proposal context is read as plain columns in one query; it must say what the loaded program says:
    every history line (status, value, improvement on the parent, reason by precedence: decision, status
    reason, result reason, log tail), the noise over replicated commits, the head's runs and known contents."""
    from farm.models import Result
    from scheduler.policy import PolicyConfig, mean

    install(monkeypatch, tmp_path)
    with session_scope() as s:
        pid = create_program(s, name="ctx", instructions="# c", proposer={"kind": "mutation"}).id
    sched = _sched()
    sched.start()
    with session_scope() as s:
        prog = s.get(Program, pid)
        head = prog.head_commit
        other = "b" * 40

        def exp(status, val=None, *, commit=head, parent=head, role=ExperimentRole.candidate, decision=None,
                result_reason=None, tail=None, status_reason=None, hw="cpu", replicate_of=None, why=None):
            e = Experiment(program_id=pid, role=role, parent_commit=parent, commit_sha=commit, proposer_kind="manual",
                           hw_class="cpu", status=status, status_reason=status_reason, decision=decision,
                           description=f"e{val}-{commit[:1]}", files={}, replicate_of=replicate_of,
                           content_hash=None if role != ExperimentRole.candidate else f"h-{commit}")
            s.add(e)
            s.flush()
            if val is not None or tail or result_reason:
                s.add(Result(experiment_id=e.id, outcome=status, val_bpb=val, reason=result_reason, log_tail=tail,
                             hw_class=hw))
            if decision is not None:
                s.add(DecisionRecord(program_id=pid, experiment_id=e.id, decision=decision, policy="confirm",
                                     reason=why or "", head_before=head, head_after=head, statistics={}))
            s.flush()
            return e

        exp(S.succeeded, 1.00, role=ExperimentRole.baseline)
        exp(S.succeeded, 1.01, role=ExperimentRole.baseline)
        kept = exp(S.succeeded, 0.98, commit=other, decision=Decision.keep, why="beat the head")
        exp(S.succeeded, 0.985, commit=other, role=ExperimentRole.confirmation, replicate_of=kept.id,
            decision=Decision.keep)
        exp(S.succeeded, 1.02, commit="c" * 40, decision=Decision.discard, why="")  # an empty decision reason
        exp(S.crashed, None, commit="d" * 40, status_reason="exit 1", tail="Traceback ...")
        exp(S.crashed, None, commit="e" * 40, tail="x" * 400 + "TAIL")  # reason from the log tail
        exp(S.timed_out, None, commit="f" * 40, result_reason="over the wall limit", tail="...")
        exp(S.succeeded, 0.97, commit="1" * 40, hw="gpu.h100")  # another class: no value
        exp(S.succeeded, 0.99, commit="2" * 40, parent=other)  # undecided, parent with two runs
        exp(S.queued, None, commit="3" * 40)
        s.commit()

    with session_scope() as s:
        prog = s.get(Program, pid)
        ctx = sched._context(s, prog)
        view = sched._load(s, prog)
        cfg = PolicyConfig.from_dict(prog.policy or {})
        # the oracle: the same context computed from the ORM view
        want = []
        for e in view.exps:
            if e.role == ExperimentRole.baseline or e.replicate_of is not None:
                continue
            val = view.value(e)
            parent = view.runs_of(e.parent_commit)
            d = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == e.id)).scalar_one_or_none()
            r = view.results.get(e.id)
            reason = d.reason if d else (e.status_reason or (
                (r.reason or (r.log_tail or "")[-300:] or None) if r is not None else None))
            want.append((e.id, e.role.value, e.description, e.decision.value if e.decision else e.status.value, val,
                         (mean(parent) - val) if (val is not None and parent) else None, reason))
        got = [(h.experiment_id, h.role, h.description, h.status, h.val_bpb, h.delta, h.reason) for h in ctx.history]
        assert got == want
        assert ctx.sigma == view.sigma(cfg)
        assert ctx.head_val_bpb == mean(view.runs_of(prog.head_commit))
        assert ctx.known_hashes == frozenset(e.content_hash for e in view.exps if e.content_hash)
        assert ctx.seed == len(view.exps)
    reasons = {h.description: h.reason for h in ctx.history}
    assert reasons["e0.98-b"] == "beat the head" and reasons["e1.02-c"] == ""
    assert reasons["eNone-d"] == "exit 1" and reasons["eNone-f"] == "over the wall limit"
    assert reasons["eNone-e"] == ("x" * 400 + "TAIL")[-300:]
    assert ctx.sigma is not None and len(ctx.history) == 8
    sched.close()


def test_a_persons_patch_is_checked_against_the_root_commit_not_a_template_changed_since(pg_env, tmp_path,
                                                                                         monkeypatch):
    """Found by review: until the first keep, the API checked a person's patch against the template on disk, but
    committed it onto the root commit; with the template changed in between (a farm upgrade), the commit carried
    the template's change too, never checked, and its stored diff showed only the patch."""
    import subprocess

    from farm.programs import head_files

    tpl = install(monkeypatch, tmp_path)
    with session_scope() as s:
        pid = create_program(s, name="drift", instructions="# go", policy={"baseline_runs": 1}).id
        make_worker(s, "w1")
        make_worker(s, "w2")
    sched = _sched(propose=False)
    sched.tick()  # the root commit, from the template as it is now; its baseline queued
    (tpl / "train.py").write_text(TRAIN.replace("WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.9"))
    sr = ("train.py\n<<<<<<< SEARCH\nEMBEDDING_LR = 0.6  # AdamW lr for embeddings\n=======\n"
          "EMBEDDING_LR = 0.7  # AdamW lr for embeddings\n>>>>>>> REPLACE\n")
    with session_scope() as s:  # as api/crud.add_candidate does it
        prog = s.get(Program, pid)
        assert prog is not None and head_files(s, prog) == {"train.py": TRAIN}
        cid = record_proposal(s, prog, parent_commit=prog.head_commit or "", base_files=head_files(s, prog),
                              edit=Edit(search_replace=sr), proposer_kind="manual", description="lr 0.7").id
    sched.tick()
    with session_scope() as s:
        e = s.get(Experiment, cid)
        assert e is not None and e.commit_sha and e.status == S.queued, e.status_reason
        parent, sha = e.parent_commit, e.commit_sha
    diff = subprocess.run(["git", "--git-dir", str(Lineage(sched.settings.repo_dir).path), "diff", parent, sha],
                          capture_output=True, text=True, check=True).stdout
    changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert changed == ["-EMBEDDING_LR = 0.6  # AdamW lr for embeddings",
                       "+EMBEDDING_LR = 0.7  # AdamW lr for embeddings"], diff
    sched.close()



def _judged_against_disagreeing_baselines(monkeypatch, tmp_path, remeasures: list[float],  # type: ignore[no-untyped-def]
                                          candidate: float) -> dict[str, Any]:
    """Baselines of 1.0 and 1.2, a candidate at `candidate`, the parent's re-measures at `remeasures`: the decision's
    statistics (and no re-measure queued past them)."""
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")  # one run queued at a time, as one worker takes them
    reset_settings_cache()
    with session_scope() as s:
        pid = create_program(s, name="broken-baseline", instructions="# go").id  # confirm, two baselines
        make_worker(s, "w1")
    sched = _sched(propose=False)
    sched.tick()
    (b1,) = queued()
    finish(b1.id, 1.0)
    sched.tick()
    (b2,) = queued()
    finish(b2.id, 1.2)
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert prog is not None
        cid = record_proposal(s, prog, parent_commit=prog.head_commit or "", proposer_kind="manual",
                              base_files={"train.py": TRAIN}, description="worse", edit=Edit(
                                  files={"train.py": TRAIN.replace("EMBEDDING_LR = 0.6", "EMBEDDING_LR = 0.9")})).id
    sched.tick()
    (run,) = queued()
    assert run.id == cid
    finish(cid, candidate)
    for value in remeasures:
        sched.tick()
        (again,) = queued()  # the decision waits for it
        assert again.commit_sha == b1.commit_sha and again.replicate_of == b1.id, again.description
        assert again.description.startswith("re-measure of #")
        finish(again.id, value)
    sched.tick()
    assert queued() == []
    with session_scope() as s:
        d = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == cid)).scalar_one()
        head = s.get(Program, pid).head_commit  # type: ignore[union-attr]
        stats = {**d.statistics, "decision": d.decision.value, "head_moved": head != b1.commit_sha}
    sched.close()
    return stats


def test_a_change_is_judged_against_the_parent_runs_that_agree(pg_env, tmp_path, monkeypatch):
    """Found by review: the policy screened the change's runs for broken measurements but averaged its parent's as
    they were. With baselines of 1.0 and 1.2 (one broken), a change at 1.05, 5 % worse than the head, was kept. The
    parent now gets another run (a re-measure, which runs even when the program is out of new work), and the change
    is judged against the runs that agree."""
    stats = _judged_against_disagreeing_baselines(monkeypatch, tmp_path, [1.001], 1.05)
    assert stats["decision"] == "discard" and not stats["head_moved"]
    assert stats["parent_runs"] == [1.0, 1.001] and stats["parent_set_aside"] == [1.2]


def test_a_parent_whose_runs_never_agree_is_re_measured_a_bounded_number_of_times(pg_env, tmp_path, monkeypatch):
    from scheduler.loop import PARENT_REMEASURES

    assert PARENT_REMEASURES == 2
    stats = _judged_against_disagreeing_baselines(monkeypatch, tmp_path, [1.4, 1.6], 1.35)
    assert stats["parent_runs"] == [pytest.approx(1.3)] and stats["decision"] == "discard"  # median of 1.0 .. 1.6
