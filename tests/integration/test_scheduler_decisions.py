"""Decisions of the real scheduler loop on Postgres, found by review: a candidate is judged only once its parent's
runs are all in, and a run set aside by a decision does not count as a measurement of the head afterwards."""

from __future__ import annotations

from sqlalchemy import select

from farm.candidates import Edit, record_proposal
from farm.db import session_scope
from farm.models import Decision, DecisionRecord, Experiment, ExperimentRole, ExperimentStatus, Program
from farm.programs import create_program
from farm.settings import reset_settings_cache
from tests.factories import make_worker
from tests.integration.test_scheduler_loop import _sched, finish, queued
from tests.toy_template import TRAIN, install

S = ExperimentStatus


def _program(tmp_path, monkeypatch, name: str, workers: int) -> int:  # type: ignore[no-untyped-def]
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "0")
    reset_settings_cache()
    with session_scope() as s:
        pid = create_program(s, name=name, instructions="# go", policy={"baseline_runs": 2}).id
        for i in range(workers):
            make_worker(s, f"w{i + 1}")
    return pid


def _candidate(pid: int, old: str, new: str) -> int:
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert prog is not None and prog.head_commit is not None
        head = s.get(Experiment, prog.head_experiment_id) if prog.head_experiment_id else None
        base = {"train.py": head.files["train.py"] if head is not None else TRAIN}
        assert old in base["train.py"]
        c = record_proposal(s, prog, parent_commit=prog.head_commit, base_files=base, proposer_kind="manual",
                            description=f"{old} -> {new}", edit=Edit(files={"train.py": base["train.py"].replace(old, new)}))
        assert c.status == S.proposed, c.status_reason
        return c.id


def _decision(exp_id: int) -> tuple[Decision | None, dict]:
    with session_scope() as s:
        e = s.get(Experiment, exp_id)
        record = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == exp_id)).scalar_one_or_none()
        return e.decision, dict(record.statistics) if record is not None else {}


def test_a_candidate_waits_for_all_of_its_parents_runs(pg_env, tmp_path, monkeypatch):
    """The second baseline was still queued when the candidate and its confirmation came in: the candidate was
    kept against the first baseline alone, a verdict that hung on which worker finished first."""
    pid = _program(tmp_path, monkeypatch, "early", workers=3)
    sched = _sched(propose=False)
    try:
        sched.tick()
        baselines = queued()
        assert [b.role for b in baselines] == [ExperimentRole.baseline] * 2
        c = _candidate(pid, "cpu=0.02", "cpu=0.03")
        sched.tick()
        finish(baselines[0].id, 1.0, worker="w1")
        finish(c, 0.99, worker="w2")
        sched.tick()
        # not judged while the second baseline is out: no confirmation asked for yet, no verdict
        assert [e for e in queued() if e.replicate_of == c] == [] and _decision(c)[0] is None
        finish(baselines[1].id, 1.0015, worker="w3")
        sched.tick()
        (conf,) = [e for e in queued() if e.replicate_of == c]
        finish(conf.id, 0.99, worker="w2")
        sched.tick()
        decision, stats = _decision(c)
        assert decision == Decision.keep and stats["parent_runs"] == [1.0, 1.0015]
    finally:
        sched.close()


def _baselines(sched, values: list[float]) -> None:  # type: ignore[no-untyped-def]
    for v in values:  # one worker: one at a time
        sched.tick()
        (b,) = queued()
        assert b.role == ExperimentRole.baseline
        finish(b.id, v)


def _confirmed(sched, exp_id: int, value: float) -> None:  # type: ignore[no-untyped-def]
    sched.tick()
    (conf,) = [e for e in queued() if e.replicate_of == exp_id]
    finish(conf.id, value)


def test_a_run_set_aside_by_a_keep_is_not_a_run_of_the_new_head(pg_env, tmp_path, monkeypatch):
    """A was kept on 0.93 and 0.93 with its first run, 0.85, set aside; that 0.85 still counted as a run of the new
    head (its mean 0.903 was what B was judged against) and in the noise estimate (sigma 0.0017 -> 0.029): B's real
    0.01 gain was discarded. The decision now marks the run, and nothing counts it afterwards."""
    pid = _program(tmp_path, monkeypatch, "aside", workers=1)
    sched = _sched(propose=False)
    try:
        _baselines(sched, [1.0, 1.0015])
        a = _candidate(pid, "cpu=0.02", "cpu=0.03")
        sched.tick()
        finish(a, 0.85)  # a jump of 0.15: held
        _confirmed(sched, a, 0.93)  # does not bear 0.85 out: 0.85 set aside, 0.93 alone needs a confirmation
        _confirmed(sched, a, 0.93)
        sched.tick()
        decision, stats = _decision(a)
        assert decision == Decision.keep and stats["set_aside"] == [0.85], stats
        with session_scope() as s:
            assert s.get(Experiment, a).set_aside  # the first run, the one set aside
            # and every view of the program agrees: not its best kept run, a discard in results.tsv
            from api.crud import _best_of
            from farm.reports import result_rows
            best = _best_of(s, pid)
            assert best is not None and best.val_bpb == 0.93
            assert [r.status for r in result_rows(s, s.get(Program, pid)) if r.experiment_id == a] == ["discard"]
        with session_scope() as s:  # what the LLM is told of the head: its runs as the policy counts them
            ctx = sched._context(s, s.get(Program, pid))
        assert ctx.head_val_bpb == 0.93 and ctx.sigma < 0.005, (ctx.head_val_bpb, ctx.sigma)
        b = _candidate(pid, "WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.7")
        sched.tick()
        finish(b, 0.92)
        _confirmed(sched, b, 0.92)
        sched.tick()
        decision, stats = _decision(b)
        assert stats["parent_runs"] == [0.93, 0.93] and stats["sigma"] < 0.005, stats
        assert decision == Decision.keep
    finally:
        sched.close()


def test_a_change_that_holds_the_kept_one_is_replayed_not_refused_as_its_own_duplicate(pg_env, tmp_path, monkeypatch):
    """A (change X) and B (X+Y) were proposed against one head; A was kept, and B, better than A, was to be replayed
    onto A: the replay is B's own files, and was refused as a duplicate of B. The gain was lost, and Y proposed on
    the new head was refused as a duplicate of B for ever. The replay runs now."""
    pid = _program(tmp_path, monkeypatch, "superset", workers=2)
    sched = _sched(propose=False)
    try:
        sched.tick()
        for w, b in zip(("w1", "w2"), queued(), strict=True):
            finish(b.id, 1.0 if w == "w1" else 1.0015, worker=w)
        a = _candidate(pid, "cpu=0.02", "cpu=0.03")
        with session_scope() as s:
            prog = s.get(Program, pid)
            x = TRAIN.replace("cpu=0.02", "cpu=0.03")
            b = record_proposal(s, prog, parent_commit=prog.head_commit, base_files={"train.py": TRAIN},
                                proposer_kind="manual", description="X and Y",
                                edit=Edit(files={"train.py": x.replace("WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.7")})
                                ).id
        sched.tick()
        finish(a, 0.99, worker="w1")
        _confirmed(sched, a, 0.99)
        sched.tick()
        assert _decision(a)[0] == Decision.keep
        finish(b, 0.97, worker="w2")  # 0.02 better than X: replayed onto the new head
        sched.tick()
        decision, stats = _decision(b)
        assert decision == Decision.discard and "replay" in stats, stats
        with session_scope() as s:
            replay = s.get(Experiment, stats["replay"]["experiment_id"])
            assert replay.status == S.queued and replay.parent_commit == s.get(Program, pid).head_commit
            assert replay.files == s.get(Experiment, b).files
        (queued_replay,) = [e for e in queued() if e.id == replay.id]
        finish(queued_replay.id, 0.97, worker="w2")
        sched.tick()  # its first improvement counts as evidence beside this run: kept without a confirmation
        decision, stats = _decision(queued_replay.id)
        assert decision == Decision.keep and stats["prior_deltas"], stats
    finally:
        sched.close()
