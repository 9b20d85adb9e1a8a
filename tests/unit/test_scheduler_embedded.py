"""The scheduler on the embedded SQLite database (no services): a program whose proposer is `manual` proposes
nothing, yet its baselines and people's patches are queued; `farm scheduler --once` stores the answers of the
LLM calls its pass started."""

from __future__ import annotations

import ast
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from farm import migrate
from farm.candidates import Edit, check_edit, record_proposal
from farm.db import session_scope
from farm.models import Experiment, ExperimentStatus, LLMCall, Program
from farm.programs import create_program
from farm.settings import get_settings, reset_settings_cache
from scheduler.loop import Scheduler
from scheduler.proposers import Proposal, ProposalContext
from tests.toy_template import TRAIN, install

S = ExperimentStatus


@pytest.fixture
def sqlite_farm(farm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, tmp_path)
    monkeypatch.setenv("FARM_LOOKAHEAD", "3")  # room for more than the baseline: the pass asks for a proposal
    reset_settings_cache()
    migrate.upgrade(get_settings().db_url)


def test_a_manual_program_is_not_asked_for_proposals(sqlite_farm: None, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # it was taken for an unknown proposer kind: every pass built the whole context (history, git read)
    # and logged ERROR "unknown proposer kind 'manual'"
    with session_scope() as s:
        pid = create_program(s, name="by-hand", instructions="# people", proposer={"kind": "manual"},
                             policy={"baseline_runs": 1}).id
    published: list[int] = []
    sched = Scheduler(publish=lambda i, hw, **kw: published.append(i))
    contexts: list[int] = []
    real = sched._context

    def counted(s: Any, p: Program, **kw: Any) -> Any:
        contexts.append(p.id)
        return real(s, p, **kw)

    monkeypatch.setattr(sched, "_context", counted)
    try:
        with caplog.at_level(logging.INFO):
            sched.tick()
            assert len(published) == 1  # the baseline
            # a person's patch is queued as before
            with session_scope() as s:
                program = s.get(Program, pid)
                assert program is not None and program.head_commit
                exp = record_proposal(s, program, parent_commit=program.head_commit,
                                      base_files={"train.py": TRAIN},
                                      edit=Edit(files={"train.py": TRAIN.replace("LR = ", "LR = 0.5 * ", 1)}),
                                      proposer_kind="manual", description="by hand")
                assert exp.status == S.proposed, exp.status_reason
            sched.tick()
            sched.tick()
        assert len(published) == 2 and not sched.inflight
        assert contexts == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert "unknown proposer kind" not in caplog.text
        with session_scope() as s:
            assert set(s.execute(select(Experiment.status)).scalars()) == {S.queued}
    finally:
        sched.close()


class _SlowLLM:
    """An LLM proposer that answers after a while, as a real one does (seconds to minutes), and records its call."""

    kind = "llm"
    inline = False

    def __init__(self, program_id: int) -> None:
        self.program_id = program_id

    def propose(self, ctx: ProposalContext) -> Proposal:
        time.sleep(0.5)
        with session_scope() as s:
            call = LLMCall(program_id=self.program_id, model="fake", purpose="propose", prompt_tokens=1,
                           completion_tokens=1, cost_usd=0.01, latency_s=0.5)
            s.add(call)
            s.flush()
            call_id = call.id
        train = ctx.head_files["train.py"] + f"# seed {ctx.seed}\n"
        return Proposal(description=f"idea {ctx.seed}", rationale="", edit=Edit(files={"train.py": train}),
                        llm_call_ids=[call_id])


def test_scheduler_once_stores_the_answers_of_the_calls_it_started(
        sqlite_farm: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `--once` ran a pass (starting LLM calls) and closed the pool at once: the calls were paid for and recorded,
    # their answers never stored
    from cli import scheduler as cli_scheduler

    with session_scope() as s:
        create_program(s, name="llm", instructions="# ideas", proposer={"model": "openai/fake"},
                       policy={"baseline_runs": 1})
    monkeypatch.setattr("scheduler.loop.publish_experiment", lambda *a, **kw: None)
    monkeypatch.setattr(Scheduler, "_default_proposer", lambda self, program: _SlowLLM(program.id))
    cli_scheduler.run(once=True, verbose=False)
    with session_scope() as s:
        calls = list(s.execute(select(LLMCall)).scalars())
        answers = list(s.execute(select(Experiment).where(Experiment.proposer_kind == "llm")).scalars())
        assert calls and len(answers) == len(calls)
        assert all(e.status == S.proposed for e in answers), [e.status_reason for e in answers]
        assert sorted(c.experiment_id or 0 for c in calls) == sorted(e.id for e in answers)
    out: dict[str, Any] = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the counters
    assert out["llm_calls_started"] == len(calls) and out["proposed"] == len(calls)


def test_one_scheduler_per_database_whatever_its_repository(sqlite_farm: None, tmp_path: Path) -> None:
    """The repository lock only covers schedulers sharing a folder: a second scheduler with a repository of its own
    (another box, `farm up` pointed at the same database) decided the same experiments and marked the first one's
    candidates invalid, their parents missing from its repository (found by review)."""
    from farm.db import SchedulerLockHeld
    from farm.lineage import Lineage

    first = Scheduler(publish=lambda *a, **k: None)
    second = Scheduler(publish=lambda *a, **k: None, lineage=Lineage(tmp_path / "elsewhere.git"))
    first.start()
    try:
        with pytest.raises(SchedulerLockHeld, match="another scheduler is running on the database"):
            second.tick()
        assert second.lineage._lock_fd is None  # a failed start does not keep the repository lock it took first
    finally:
        first.close()
    second.start()  # the first one's close() freed the database
    second.close()



class _CutOffLLM:
    """An LLM whose answer ran into max_tokens: its edit is broken (here: it breaks train.py's syntax)."""

    kind = "llm"
    inline = False

    def propose(self, ctx: ProposalContext) -> Proposal:
        cut = ctx.head_files["train.py"][: len(ctx.head_files["train.py"]) // 2] + "\ndef half(\n"
        return Proposal(description="cut", rationale="", edit=Edit(files={"train.py": cut}),
                        defect="the answer was cut off at max_tokens=64")


def test_an_answer_cut_off_at_max_tokens_says_so_where_it_is_stored(
        sqlite_farm: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import scheduler as cli_scheduler

    with session_scope() as s:
        program = create_program(s, name="cut", instructions="# ideas", proposer={"model": "openai/fake"},
                                 policy={"baseline_runs": 1})
        pid = program.id
    monkeypatch.setattr("scheduler.loop.publish_experiment", lambda *a, **kw: None)
    monkeypatch.setattr(Scheduler, "_default_proposer", lambda self, program: _CutOffLLM())
    cli_scheduler.run(once=True, verbose=False)
    with session_scope() as s:
        reasons = list(s.execute(select(Experiment.status_reason).where(Experiment.proposer_kind == "llm")).scalars())
        assert reasons and all(r.startswith("the answer was cut off at max_tokens=64; ") for r in reasons), reasons
        # a repair is checked against the crashed run's files, not the ones the scheduler checked it against, and a
        # check that failed in the proposer thread is redone when stored: the defect led the reason in neither case
        program = s.get(Program, pid)
        assert program is not None and program.head_commit
        half = TRAIN[: len(TRAIN) // 2] + "\ndef half(\n"
        for checked_against in ({"train.py": TRAIN + "# other\n"}, None):
            checked = check_edit(checked_against, Edit(files={"train.py": half}), ["train.py"]) \
                if checked_against else None
            exp = record_proposal(s, program, parent_commit=program.head_commit, base_files={"train.py": TRAIN},
                                  edit=Edit(files={"train.py": half}), proposer_kind="repair", description="r",
                                  checked=checked, defect="the answer was cut off at max_tokens=64")
            assert exp.status == S.invalid
            assert exp.status_reason and exp.status_reason.startswith("the answer was cut off at max_tokens=64; ")
        # a valid edit is stored as proposed whatever the answer's defect: the edit is what runs
        ok = record_proposal(s, program, parent_commit=program.head_commit, base_files={"train.py": TRAIN},
                             edit=Edit(files={"train.py": TRAIN.replace("LR = ", "LR = 0.25 * ", 1)}),
                             proposer_kind="llm", description="ok", defect="the answer was cut off at max_tokens=64")
        assert ok.status == S.proposed and ok.status_reason is None
