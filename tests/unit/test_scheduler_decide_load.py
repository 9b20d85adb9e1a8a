"""What the scheduler's decision phase reads, on the embedded SQLite database (no services): only what is left to
decide. It loaded every crashed run, every repair and every commit run twice or more of every program, stopped ones
too, on every pass (0.94 s a pass at 100k experiments, growing with each crash)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from farm import migrate
from farm.db import get_engine, session_scope
from farm.models import (
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentRole,
    ExperimentStatus,
    Program,
    ProgramStatus,
    Result,
)
from farm.programs import create_program
from farm.settings import get_settings, reset_settings_cache
from scheduler.loop import Scheduler
from scheduler.policy import PolicyConfig, noise_sigma
from scheduler.proposers import Proposal, ProposalContext, ProposerError
from tests.toy_template import TRAIN, install

S = ExperimentStatus
R = ExperimentRole
FIXABLE = "Traceback (most recent call last):\n  File \"train.py\"\nNameError: name 'x' is not defined"


class _NoAnswer:
    kind = "llm"
    inline = False

    def propose(self, ctx: ProposalContext) -> Proposal:
        raise ProposerError("not asked in this test")


@pytest.fixture
def sched(farm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scheduler]:
    install(monkeypatch, tmp_path)
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)
    sched = Scheduler(publish=lambda *a, **kw: None, proposer_factory=lambda p: _NoAnswer())
    try:
        yield sched
    finally:
        sched.close()


def _program(sched: Scheduler, name: str, *, status: ProgramStatus = ProgramStatus.active) -> tuple[int, str]:
    with session_scope() as s:
        pid = create_program(s, name=name, instructions="# i", proposer={"kind": "llm", "model": "m"},
                             policy={"max_repairs": 2}).id
    sched.start()
    sched._init_programs()  # the program's branch and template commit
    with session_scope() as s:
        p = s.get(Program, pid)
        assert p is not None and p.head_commit
        p.status = status
        return pid, p.head_commit


def _exp(s: Any, pid: int, status: ExperimentStatus, *, commit: str | None, parent: str, val: float | None = None,
         role: ExperimentRole = R.candidate, decision: Decision | None = None, tail: str | None = None,
         repair_of: int | None = None, replicate_of: int | None = None) -> int:
    e = Experiment(program_id=pid, role=role, parent_commit=parent, commit_sha=commit, proposer_kind="llm",
                   hw_class="cpu", status=status, decision=decision, description="d", files={"train.py": TRAIN},
                   repair_of=repair_of, replicate_of=replicate_of)
    s.add(e)
    s.flush()
    if status in (S.succeeded, S.crashed):
        s.add(Result(experiment_id=e.id, outcome=status, val_bpb=val, log_tail=tail or "", hw_class="cpu"))
    return e.id


def _history(pid: int, head: str, n: int) -> None:
    """A program's past: a baseline, `n` crashes each repaired (the repair ran and was discarded), `n` candidates
    decided after a confirmation (a commit run twice), and a commit whose first row crashed before two runs."""
    with session_scope() as s:
        _exp(s, pid, S.succeeded, commit=head, parent=head, val=1.0, role=R.baseline)
        for i in range(n):
            crash = _exp(s, pid, S.crashed, commit=f"{pid}c{i}".ljust(40, "0"), parent=head, tail=FIXABLE)
            _exp(s, pid, S.succeeded, commit=f"{pid}r{i}".ljust(40, "0"), parent=head, val=1.01,
                 decision=Decision.discard, repair_of=crash)
            sha = f"{pid}k{i}".ljust(40, "0")
            cand = _exp(s, pid, S.succeeded, commit=sha, parent=head, val=0.99 + i / 1000, decision=Decision.discard)
            _exp(s, pid, S.succeeded, commit=sha, parent=head, val=0.995 + i / 3000, role=R.confirmation,
                 decision=Decision.discard, replicate_of=cand)
        shared = f"{pid}s".ljust(40, "0")
        _exp(s, pid, S.crashed, commit=shared, parent=head, tail="out of memory")
        for v in (1.002, 1.004):
            _exp(s, pid, S.succeeded, commit=shared, parent=head, val=v, decision=Decision.discard)


class _Reads:
    """Experiment rows built as ORM objects, and statements, while counting."""

    def __init__(self) -> None:
        self.rows = 0
        self.statements = 0
        self.on = False
        event.listen(Experiment, "load", self._row)
        event.listen(get_engine(), "before_cursor_execute", self._statement)

    def _row(self, *_: Any) -> None:
        self.rows += self.on

    def _statement(self, *_: Any) -> None:
        self.statements += self.on

    def decide(self, sched: Scheduler) -> dict[str, int]:
        self.rows = self.statements = 0
        stats: dict[str, int] = defaultdict(int)
        self.on = True
        try:
            sched._decide(stats)
        finally:
            self.on = False
        return stats

    def close(self) -> None:
        event.remove(Experiment, "load", self._row)
        event.remove(get_engine(), "before_cursor_execute", self._statement)


def test_a_pass_reads_none_of_a_decided_history(sched: Scheduler) -> None:
    active, head = _program(sched, "busy")
    stopped, head2 = _program(sched, "done", status=ProgramStatus.stopped)
    _history(active, head, 60)
    _history(stopped, head2, 60)
    reads = _Reads()
    try:
        stats = reads.decide(sched)
        assert stats.get("repairs", 0) == 0  # every crash has its repair already
        assert reads.rows == 0  # was 2 x 246: every crash, repair and twice-run commit, the stopped program's too
        quiet = reads.statements
        reads.decide(sched)
        assert reads.statements <= quiet  # what a crash offers a repair is read once, not every pass

        # a new fixable crash: its repair is asked for, reading that one row
        with session_scope() as s:
            fresh = _exp(s, active, S.crashed, commit="f" * 40, parent=head, tail=FIXABLE)
        stats = reads.decide(sched)
        assert stats["repairs"] == 1 and [j.repair_of for j in sched.inflight.values()] == [fresh]
        assert reads.rows == 1
    finally:
        reads.close()


def test_a_verdict_reads_its_runs_and_pools_the_whole_history_noise(sched: Scheduler) -> None:
    pid, head = _program(sched, "judged")
    _history(pid, head, 40)
    with session_scope() as s:
        todo = _exp(s, pid, S.succeeded, commit="e" * 40, parent=head, val=1.05)  # clearly worse: a discard
    reads = _Reads()
    try:
        stats = reads.decide(sched)
    finally:
        reads.close()
    assert stats["discards"] == 1
    assert reads.rows <= 3  # the run, its parent's run (the baseline), nothing of the decided history
    with session_scope() as s:
        p = s.get(Program, pid)
        assert p is not None
        record = s.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == todo)).scalar_one()
        full = sched._load(s, p)  # the noise as a load of the whole program gives it, to the last bit
        cfg = PolicyConfig.from_dict(p.policy or {})
        assert record.statistics["sigma"] == noise_sigma(full.groups(), prior=cfg.prior_sigma)[0] == full.sigma(cfg)
        assert sched._pooled_groups(s, p) == [g for g in full.groups() if len(g) >= 2]
