"""The experiment state machine: every status change goes through here, as compare-and-set.

    proposed -> invalid | queued
    proposed -> cancelled                    (its program stopped or finished first)
    queued   -> running                      (a worker's claim, while its program is not paused or stopped)
    queued   -> cancelled                    (its program was stopped)
    running  -> succeeded | crashed | timed_out | refused   (a worker's report, with its one result)
    running  -> queued                       (the reaper: heartbeat stale, retries left)
    running  -> lost                         (the reaper: retries spent)
    succeeded: decision None -> keep | discard (the scheduler's policy)

Each function locks the row (SELECT ... FOR UPDATE on Postgres; SQLite transactions begin
IMMEDIATE, see farm/db.py), checks the expected state, writes, and returns False when another
process got there first. Callers own the transaction (use farm.db.session_scope).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.db import as_utc, db_now
from farm.models import (
    Decision,
    Experiment,
    ExperimentStatus,
    Program,
    ProgramStatus,
    Result,
    Worker,
    utcnow,
)

S = ExperimentStatus

ALLOWED: dict[ExperimentStatus, frozenset[ExperimentStatus]] = {
    S.proposed: frozenset({S.invalid, S.queued, S.cancelled}),
    S.queued: frozenset({S.running, S.cancelled}),
    S.running: frozenset({S.succeeded, S.crashed, S.timed_out, S.refused, S.queued, S.lost}),
    S.succeeded: frozenset(),
    S.crashed: frozenset(),
    S.timed_out: frozenset(),
    S.refused: frozenset(),
    S.lost: frozenset(),
    S.invalid: frozenset(),
    S.cancelled: frozenset(),
}

OUTCOMES = frozenset({S.succeeded, S.crashed, S.timed_out, S.refused})


class IllegalTransition(ValueError):
    pass


def _locked(session: Session, experiment_id: int) -> Experiment | None:
    stmt = select(Experiment).where(Experiment.id == experiment_id).with_for_update()
    # populate_existing: never trust a stale identity-map copy when deciding a race
    return session.execute(stmt.execution_options(populate_existing=True)).scalar_one_or_none()


def locked_many(session: Session, experiment_ids: Iterable[int]) -> list[Experiment]:
    """Lock several experiment rows at once (in id order, so two callers cannot deadlock), for `move`."""
    stmt = (select(Experiment).where(Experiment.id.in_(list(experiment_ids))).order_by(Experiment.id)
            .with_for_update())
    return list(session.execute(stmt.execution_options(populate_existing=True)).scalars())


def _legal(to: ExperimentStatus, expect: Iterable[ExperimentStatus]) -> frozenset[ExperimentStatus]:
    expect = frozenset(expect)
    bad = [s for s in expect if to not in ALLOWED[s]]
    if bad:
        raise IllegalTransition(f"{', '.join(s.value for s in bad)} -> {to.value} is not a legal transition")
    return expect


def move(exp: Experiment, to: ExperimentStatus, *, expect: Iterable[ExperimentStatus], **values: Any) -> bool:
    """`transition` for a row this transaction has already locked (`locked_many`); no flush."""
    if exp.status not in _legal(to, expect):
        return False
    exp.status = to
    for key, value in values.items():
        setattr(exp, key, value)
    return True


def transition(session: Session, experiment_id: int, to: ExperimentStatus, *,
               expect: Iterable[ExperimentStatus], **values: Any) -> bool:
    """Move an experiment to `to` if its current status is one of `expect`; False otherwise."""
    expect = _legal(to, expect)
    exp = _locked(session, experiment_id)
    if exp is None or not move(exp, to, expect=expect, **values):
        return False
    session.flush()
    return True


def mark_queued(session: Session, experiment_id: int) -> bool:
    return transition(session, experiment_id, S.queued, expect={S.proposed}, queued_at=utcnow())


def cancel_unstarted(session: Session, program_id: int, reason: str, *,
                     statuses: Iterable[ExperimentStatus] = (S.proposed, S.queued)) -> list[int]:
    """The program's experiments in `statuses` (proposed, queued) -> cancelled with `reason`: its program was
    stopped, or finished with them still proposed. A run a worker claimed meanwhile is left to finish."""
    expect = _legal(S.cancelled, statuses)
    ids = session.execute(select(Experiment.id).where(Experiment.program_id == program_id,
                                                      Experiment.status.in_(list(expect)))).scalars().all()
    done = [exp.id for exp in locked_many(session, ids)
            if move(exp, S.cancelled, expect=expect, status_reason=reason, finished_at=utcnow())]
    session.flush()
    return done


def mark_invalid(session: Session, experiment_id: int, reason: str) -> bool:
    return transition(session, experiment_id, S.invalid, expect={S.proposed}, status_reason=reason,
                      finished_at=utcnow())


# a queued run of a program in one of these is not started: a paused one's waits (the broker reconciler publishes it
# again once the program is resumed), a stopped one's is cancelled with the stop
HELD_PROGRAMS = (ProgramStatus.paused, ProgramStatus.stopped)


def claim(session: Session, experiment_id: int, worker_id: str) -> bool:
    """queued -> running for this worker. A duplicate delivery, a lost race or a program paused or stopped (its
    queued runs used to train all the same: found by review) returns False."""
    exp = _locked(session, experiment_id)
    if exp is None:
        return False
    held = session.execute(select(Program.status).where(Program.id == exp.program_id)).scalar_one_or_none()
    if held in HELD_PROGRAMS:
        return False
    ok = move(exp, S.running, expect={S.queued}, worker_id=worker_id, started_at=utcnow(), heartbeat_at=utcnow(),
              progress=0.0, current_loss=None)
    if ok:
        session.flush()
        # a worker with two slots claims the next job while one runs: the one it runs stays its current one
        session.execute(update(Worker).where(Worker.id == worker_id)
                        .values(current_experiment_id=func.coalesce(Worker.current_experiment_id, experiment_id),
                                last_heartbeat=utcnow()))
    return ok


def heartbeat(session: Session, experiment_id: int, worker_id: str, *, progress: float | None = None,
              current_loss: float | None = None, current: bool = False) -> bool:
    """Stamp the experiment and its worker with the database clock; False if the claim was lost. `current`: this
    run holds the worker's device, so it is the worker's current experiment."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    if current_loss is not None:
        values["current_loss"] = current_loss
    res = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.worker_id == worker_id,
               Experiment.status == S.running)
        .values(**values))
    ok = bool(getattr(res, "rowcount", 0))
    worker_values: dict[str, Any] = {"last_heartbeat": utcnow()}
    if current and ok:
        worker_values["current_experiment_id"] = experiment_id
    session.execute(update(Worker).where(Worker.id == worker_id).values(**worker_values))
    return ok


def record_result(session: Session, experiment_id: int, worker_id: str, outcome: ExperimentStatus,
                  **result_fields: Any) -> bool:
    """running -> outcome and the experiment's one Result, atomically.

    Refused when the experiment is no longer running under this worker (it was reaped and
    re-queued, or another delivery already reported): exactly one result per experiment.
    """
    if outcome not in OUTCOMES:
        raise IllegalTransition(f"{outcome.value} is not a run outcome")
    result_fields = {key: without_nul(value) for key, value in result_fields.items()}
    exp = _locked(session, experiment_id)
    if exp is None or exp.status != S.running or exp.worker_id != worker_id:
        return False
    exp.status = outcome
    exp.finished_at = utcnow()
    exp.progress = 100.0 if outcome == S.succeeded else exp.progress
    exp.status_reason = result_fields.get("reason")
    session.add(Result(experiment_id=experiment_id, worker_id=worker_id, outcome=outcome, **result_fields))
    session.execute(update(Worker).where(Worker.id == worker_id, Worker.current_experiment_id == experiment_id)
                    .values(current_experiment_id=None, last_heartbeat=utcnow()))
    try:
        session.flush()
    except IntegrityError:  # a result already exists: the unique key is the last line of defence
        session.rollback()
        return False
    return True


def without_nul(value: Any) -> Any:
    """`value` with NUL characters removed from every string in it (dicts and lists too). The reason, the log tail
    and the rest of a result are the candidate's output: Postgres text cannot hold NUL, and one NUL in the last
    lines failed the whole write (psycopg DataError), so the result was lost and the run repeated until `lost`."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nul(v) for v in value]
    return value


def set_decision(session: Session, experiment_id: int, decision: Decision) -> bool:
    exp = _locked(session, experiment_id)
    if not decide_locked(exp, decision):
        return False
    session.flush()
    return True


def decide_locked(exp: Experiment | None, decision: Decision) -> bool:
    """set_decision for a row this transaction has locked already (locked_many): no statement of its own; the
    change is flushed with the transaction's others."""
    if exp is None or exp.status != S.succeeded or exp.decision is not None:
        return False
    exp.decision = decision
    exp.decided_at = utcnow()
    return True


def stale_after(interval: float, worker_interval: float | None) -> float:
    """Seconds without a heartbeat after which a worker, or its run, counts as gone: two of the longer of the
    reader's interval and the worker's own (workers.heartbeat_interval), so hosts need not agree on the setting."""
    return 2 * max(interval, worker_interval or 0.0)


def reap_stale(session: Session, *, interval: float, max_retries: int) -> list[tuple[int, ExperimentStatus]]:
    """Running experiments whose heartbeat is older than stale_after(interval, their worker's interval) by the
    database clock: re-queue them while retries remain, else mark them lost. Returns (id, new status) for each."""
    now = db_now(session)
    # the reader's own interval is the shortest possible limit: nothing newer than it can be stale
    candidates = session.execute(
        select(Experiment.id).where(Experiment.status == S.running,
                                    Experiment.heartbeat_at < now - timedelta(seconds=2 * interval))
    ).scalars().all()
    reaped: list[tuple[int, ExperimentStatus]] = []
    for exp_id in candidates:
        exp = _locked(session, exp_id)
        if exp is None or exp.status != S.running or exp.heartbeat_at is None:
            continue
        worker_interval = session.execute(select(Worker.heartbeat_interval)
                                          .where(Worker.id == exp.worker_id)).scalar() if exp.worker_id else None
        limit = stale_after(interval, worker_interval)
        if as_utc(exp.heartbeat_at) >= now - timedelta(seconds=limit):
            continue
        attempt = {"worker_id": exp.worker_id, "started_at": _iso(exp.started_at),
                   "last_heartbeat": _iso(exp.heartbeat_at), "reaped_at": now.isoformat(),
                   "progress": exp.progress}
        exp.attempts = [*(exp.attempts or []), attempt]
        if exp.worker_id:
            session.execute(update(Worker).where(Worker.id == exp.worker_id,
                                                 Worker.current_experiment_id == exp.id)
                            .values(current_experiment_id=None))
        if exp.retry_count < max_retries:
            exp.status = S.queued
            exp.retry_count += 1
            exp.worker_id = None
            exp.queued_at = now
            exp.progress = None
            reaped.append((exp.id, S.queued))
        else:
            exp.status = S.lost
            exp.status_reason = f"worker lost {exp.retry_count + 1} times (heartbeat older than {limit:g}s)"
            exp.finished_at = now
            reaped.append((exp.id, S.lost))
    session.flush()
    return reaped


def _iso(value: Any) -> str | None:
    return as_utc(value).isoformat() if value is not None else None
