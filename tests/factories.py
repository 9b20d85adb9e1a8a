"""Small builders for rows the tests need (plain inserts through the ORM)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from farm.models import Experiment, ExperimentStatus, Program, Worker


def make_program(session: Session, slug: str = "prog", **kw: Any) -> Program:
    values: dict[str, Any] = dict(name=slug, slug=slug, instructions="# research", time_budget=5.0,
                                  branch=f"research/{slug}", profile="cpu", hw_class="cpu")
    values.update(kw)
    p = Program(**values)
    session.add(p)
    session.flush()
    return p


def make_experiment(session: Session, program: Program, status: ExperimentStatus = ExperimentStatus.queued,
                    **kw: Any) -> Experiment:
    values: dict[str, Any] = dict(program_id=program.id, parent_commit="0" * 40, proposer_kind="manual",
                                  hw_class=program.hw_class, status=status, files={"train.py": "print(1)\n"})
    values.update(kw)
    e = Experiment(**values)
    session.add(e)
    session.flush()
    return e


def make_worker(session: Session, worker_id: str, hw_class: str = "cpu") -> Worker:
    w = Worker(id=worker_id, host="test", hw_class=hw_class)
    session.add(w)
    session.flush()
    return w


def make_silent_run(worker_id: str = "w1", silent_for: float = 30.0) -> int:
    """A run claimed by `worker_id` whose last heartbeat is `silent_for` seconds old, on a migrated database: a
    worker that died, or whose heartbeats failed during an outage. Returns its experiment id."""
    from farm import states
    from farm.db import db_now, session_scope

    with session_scope() as s:
        prog = make_program(s)
        make_worker(s, worker_id)
        exp_id = make_experiment(s, prog).id
    with session_scope() as s:
        assert states.claim(s, exp_id, worker_id)
        s.execute(update(Experiment).where(Experiment.id == exp_id)
                  .values(heartbeat_at=db_now(s) - timedelta(seconds=silent_for)))
    return exp_id
