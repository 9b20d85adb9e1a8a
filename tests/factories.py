"""Small builders for rows the tests need (plain inserts through the ORM)."""

from __future__ import annotations

from typing import Any

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
