"""Reads and writes behind the routes and the dashboard pages (keyword-only, one session each).

Lists select only the columns they show: an experiment row carries its files and diff (tens of
kilobytes), which a page of fifty must not drag out of the database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import schemas
from farm.candidates import Edit, record_proposal
from farm.db import as_utc, db_now
from farm.models import (
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentRole,
    ExperimentStatus,
    LLMCall,
    Program,
    ProgramStatus,
    Result,
    Worker,
)
from farm.programs import create_program, head_files
from farm.states import HELD_PROGRAMS, cancel_unstarted, stale_after
from farm.stats import baseline_val_bpb, baseline_val_bpbs, program_noise, run_commit

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
MAX_ID = 2**31 - 1
SortKey = Literal["id", "val_bpb", "created_at", "finished_at"]


# ---------------------------------------------------------------- programs

def get_program(session: Session, *, ref: str) -> Program | None:
    """A program by numeric id or by slug; None for anything else."""
    if ref.isascii() and ref.isdigit() and len(ref) < 11:  # isdigit() alone accepts '³', which int() refuses
        return session.get(Program, int(ref)) if 0 < int(ref) <= MAX_ID else None
    if SLUG.match(ref):
        return session.execute(select(Program).where(Program.slug == ref)).scalar_one_or_none()
    return None


def add_program(session: Session, *, body: schemas.ProgramCreate) -> Program:
    return create_program(
        session, name=body.name, instructions=body.instructions, profile=body.profile,
        time_budget=body.time_budget, hw_class=body.hw_class, editable=list(body.editable_files),
        proposer=body.proposer.model_dump(exclude_none=True), policy=body.policy.model_dump(exclude_none=True),
        stop_rules=body.stop_rules.model_dump(mode="json", exclude_none=True), weight=body.weight, template=body.template)


PROGRAM_MOVES: dict[str, tuple[ProgramStatus, frozenset[ProgramStatus]]] = {
    "pause": (ProgramStatus.paused, frozenset({ProgramStatus.active})),
    "resume": (ProgramStatus.active, frozenset({ProgramStatus.paused})),
    "stop": (ProgramStatus.stopped, frozenset({ProgramStatus.active, ProgramStatus.paused})),
}


def move_program(session: Session, *, program_id: int, action: str) -> tuple[bool, Program | None]:
    """pause / resume / stop as compare-and-set under a row lock: (changed, program)."""
    to, expect = PROGRAM_MOVES[action]
    prog = session.execute(select(Program).where(Program.id == program_id).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one_or_none()
    if prog is None:
        return False, None
    if prog.status == to:
        return True, prog  # idempotent: pausing a paused program is not an error
    if prog.status not in expect:
        return False, prog
    prog.status = to
    prog.status_reason = f"{action} requested through the API"
    if to == ProgramStatus.stopped:  # what has not started never will (a run in flight finishes and is recorded)
        cancel_unstarted(session, prog.id, "its program was stopped before it ran")
    session.flush()
    return True, prog


def _counts(session: Session, column: Any, program_ids: Sequence[int] | None) -> dict[int, dict[str, int]]:
    stmt = (select(Experiment.program_id, column, func.count()).where(column.is_not(None))
            .group_by(Experiment.program_id, column))
    if program_ids is not None:
        stmt = stmt.where(Experiment.program_id.in_(program_ids))
    out: dict[int, dict[str, int]] = {}
    for pid, key, n in session.execute(stmt):
        if key is not None:
            out.setdefault(pid, {})[str(getattr(key, "value", key))] = int(n)
    return out


def _best_of(session: Session, program_id: int) -> schemas.BestPublic | None:
    row = session.execute(
        select(Experiment.id, Experiment.commit_sha, Experiment.description, Result.val_bpb, Result.test_bpb)
        .join(Result, Result.experiment_id == Experiment.id)
        .where(Experiment.program_id == program_id, Experiment.decision == Decision.keep,
               Experiment.set_aside.is_(False), Result.val_bpb.is_not(None))
        .order_by(Result.val_bpb.asc(), Experiment.id.asc()).limit(1)).one_or_none()
    if row is None:
        return None
    return schemas.BestPublic(experiment_id=row.id, commit=row.commit_sha, val_bpb=row.val_bpb,
                              test_bpb=row.test_bpb, description=row.description)


def _best(session: Session, program_ids: Sequence[int] | None) -> dict[int, schemas.BestPublic]:
    ranked = (
        select(Experiment.program_id, Experiment.id, Experiment.commit_sha, Experiment.description,
               Result.val_bpb, Result.test_bpb,
               func.row_number().over(partition_by=Experiment.program_id,
                                      order_by=(Result.val_bpb.asc(), Experiment.id.asc())).label("rank"))
        .join(Result, Result.experiment_id == Experiment.id)
        .where(Experiment.decision == Decision.keep, Experiment.set_aside.is_(False), Result.val_bpb.is_not(None))
    )
    if program_ids is not None:
        ranked = ranked.where(Experiment.program_id.in_(program_ids))
    sub = ranked.subquery()
    out: dict[int, schemas.BestPublic] = {}
    for row in session.execute(select(sub).where(sub.c.rank == 1)):
        out[row.program_id] = schemas.BestPublic(experiment_id=row.id, commit=row.commit_sha,
                                                 val_bpb=row.val_bpb, test_bpb=row.test_bpb,
                                                 description=row.description)
    return out


def _public(program: Program) -> dict[str, Any]:
    return schemas.ProgramPublic.model_validate(program).model_dump()


def list_programs(session: Session) -> list[schemas.ProgramSummary]:
    programs = list(session.execute(select(Program).order_by(Program.id.desc())).scalars())
    counts = _counts(session, Experiment.status, None)
    best = _best(session, None)
    baselines = baseline_val_bpbs(session, None)
    return [schemas.ProgramSummary(**_public(p), counts=counts.get(p.id, {}), best=best.get(p.id),
                                   baseline_val_bpb=baselines.get(p.id)) for p in programs]


def program_detail(session: Session, *, program: Program) -> schemas.ProgramDetail:
    pid = program.id
    noise = program_noise(session, pid)
    spend, calls = session.execute(
        select(func.coalesce(func.sum(LLMCall.cost_usd), 0.0), func.count(LLMCall.id))
        .where(LLMCall.program_id == pid)).one()
    hour_ago = db_now(session) - timedelta(hours=1)
    per_hour = session.execute(
        select(func.count()).select_from(Experiment)
        .where(Experiment.program_id == pid, Experiment.finished_at >= hour_ago,
               Experiment.status.not_in([ExperimentStatus.invalid, ExperimentStatus.cancelled]))).scalar_one()
    return schemas.ProgramDetail(
        **_public(program), counts=_counts(session, Experiment.status, [pid]).get(pid, {}),
        decisions=_counts(session, Experiment.decision, [pid]).get(pid, {}),
        best=_best_of(session, pid), baseline_val_bpb=baseline_val_bpb(session, pid),
        instructions=program.instructions, root_commit=program.root_commit,
        head_experiment_id=program.head_experiment_id, noise_sigma=noise.sigma, noise_source=noise.source,
        llm_spend_usd=float(spend), llm_calls=int(calls), experiments_per_hour=float(per_hour))


# ---------------------------------------------------------------- experiments

LIST_COLUMNS = (
    Experiment.id, Experiment.program_id, Experiment.role, Experiment.status, Experiment.status_reason,
    Experiment.decision, Experiment.description, Experiment.proposer_kind, Experiment.parent_commit,
    Experiment.commit_sha, Experiment.seed, Experiment.worker_id, Experiment.progress, Experiment.created_at,
    Experiment.started_at, Experiment.finished_at, Experiment.set_aside, Result.val_bpb, Result.test_bpb,
    Result.peak_vram_mb,
)


def _parent_means(session: Session, program_id: int, commits: set[str]) -> dict[str, float]:
    commits.discard("")
    if not commits:
        return {}
    key = run_commit()
    hw = select(Program.hw_class).where(Program.id == program_id).scalar_subquery()
    rows = session.execute(
        select(key, func.avg(Result.val_bpb)).join(Result, Result.experiment_id == Experiment.id)
        .where(Experiment.program_id == program_id, Experiment.status == ExperimentStatus.succeeded,
               Result.val_bpb.is_not(None), Experiment.set_aside.is_(False),  # as the scheduler counts a parent:
               func.coalesce(Result.hw_class, Experiment.hw_class) == hw,  # its runs on the program's hardware
               (Experiment.commit_sha.in_(commits))
               | (Experiment.commit_sha.is_(None) & Experiment.parent_commit.in_(commits)))
        .group_by(key))
    return {c: float(v) for c, v in rows if v is not None}


def _rows_to_public(session: Session, program_id: int, rows: Sequence[Any]) -> list[schemas.ExperimentPublic]:
    parents = _parent_means(session, program_id, {r.parent_commit for r in rows})
    out = []
    for r in rows:
        pv = parents.get(r.parent_commit)
        out.append(schemas.ExperimentPublic(
            id=r.id, program_id=r.program_id, role=r.role, status=r.status, status_reason=r.status_reason,
            decision=r.decision, description=r.description, proposer_kind=r.proposer_kind,
            parent_commit=r.parent_commit, commit_sha=r.commit_sha, seed=r.seed, val_bpb=r.val_bpb,
            test_bpb=r.test_bpb, parent_val_bpb=pv,
            delta=(r.val_bpb - pv) if (r.val_bpb is not None and pv is not None) else None,
            memory_gb=(r.peak_vram_mb / 1024.0) if r.peak_vram_mb is not None else None,
            worker_id=r.worker_id, progress=r.progress, created_at=r.created_at, started_at=r.started_at,
            finished_at=r.finished_at, set_aside=r.set_aside))
    return out


def list_experiments(session: Session, *, program_id: int, status: Sequence[ExperimentStatus] = (),
                     decision: Decision | None = None, role: ExperimentRole | None = None,
                     sort: SortKey = "id", order: Literal["asc", "desc"] = "desc", limit: int = 50,
                     offset: int = 0, before_id: int | None = None) -> schemas.ExperimentPage:
    """One page. `before_id` (newest first only) is a keyset cursor: runs with a smaller id, a walk of the
    (program_id, id) index that stays put while new runs arrive, which an offset does not (each arrival
    pushed the previous page's last row onto the next: five arrivals between two pages, five rows twice)."""
    if before_id is not None and (sort, order) != ("id", "desc"):
        raise ValueError("before_id pages the newest-first order only (sort=id, order=desc)")
    where = [Experiment.program_id == program_id]
    if status:
        where.append(Experiment.status.in_(list(status)))
    if decision is not None:
        where.append(Experiment.decision == decision)
    if role is not None:
        where.append(Experiment.role == role)
    total = session.execute(select(func.count()).select_from(Experiment).where(*where)).scalar_one()
    if before_id is not None:
        where.append(Experiment.id < before_id)
    col: Any = {"id": Experiment.id, "val_bpb": Result.val_bpb, "created_at": Experiment.created_at,
                "finished_at": Experiment.finished_at}[sort]
    ordered = col.asc() if order == "asc" else col.desc()
    # NULLS LAST on a never-null column would keep Postgres off its (program_id, column) index
    if sort not in ("id", "created_at"):
        ordered = ordered.nulls_last()
    stmt = (select(*LIST_COLUMNS).outerjoin(Result, Result.experiment_id == Experiment.id)
            .where(*where).order_by(ordered, Experiment.id.desc())
            .limit(limit + 1).offset(offset))
    rows = session.execute(stmt).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return schemas.ExperimentPage(items=_rows_to_public(session, program_id, rows), total=int(total),
                                  limit=limit, offset=offset, before_id=before_id,
                                  next_before_id=rows[-1].id if more and (sort, order) == ("id", "desc") else None)


def newer_than(session: Session, *, program_id: int, before_id: int, limit: int) -> tuple[int, int | None]:
    """For the dashboard's pager at cursor `before_id`: how many runs are newer (at or above it), and the
    cursor of the page before it (None: the first page). Two walks of the (program_id, id) index."""
    at_or_above = (Experiment.program_id == program_id, Experiment.id >= before_id)
    newer = session.execute(select(func.count()).select_from(Experiment).where(*at_or_above)).scalar_one()
    cursor = session.execute(select(Experiment.id).where(*at_or_above).order_by(Experiment.id.asc())
                             .offset(limit).limit(1)).scalar_one_or_none()
    return int(newer), cursor


def experiment_public(session: Session, *, experiment_id: int) -> schemas.ExperimentPublic | None:
    row = session.execute(select(*LIST_COLUMNS).outerjoin(Result, Result.experiment_id == Experiment.id)
                          .where(Experiment.id == experiment_id)).one_or_none()
    return _rows_to_public(session, row.program_id, [row])[0] if row is not None else None


def _seconds(a: Any, b: Any) -> float | None:
    return (as_utc(b) - as_utc(a)).total_seconds() if a is not None and b is not None else None


def experiment_detail(session: Session, *, experiment_id: int,
                      heartbeat_interval: float) -> schemas.ExperimentDetail | None:
    if not 0 < experiment_id <= MAX_ID:
        return None
    exp = session.get(Experiment, experiment_id)
    if exp is None:
        return None
    base = experiment_public(session, experiment_id=experiment_id)
    assert base is not None
    result = session.execute(select(Result).where(Result.experiment_id == experiment_id)).scalar_one_or_none()
    record = session.execute(select(DecisionRecord).where(DecisionRecord.experiment_id == experiment_id)
                             ).scalar_one_or_none()
    worker = None
    if exp.worker_id:
        worker = next(iter(list_workers(session, heartbeat_interval=heartbeat_interval, ids=[exp.worker_id])),
                      None)
    return schemas.ExperimentDetail(
        **base.model_dump(), rationale=exp.rationale, diff=exp.diff, retry_count=exp.retry_count,
        attempts=list(exp.attempts or []), current_loss=exp.current_loss, heartbeat_at=exp.heartbeat_at,
        metrics=schemas.MetricsPublic.model_validate(result) if result else None,
        decision_record=schemas.DecisionPublic.model_validate(record) if record else None,
        log_tail=result.log_tail if result else "", worker=worker,
        timings=schemas.TimingsPublic(
            created_at=exp.created_at, queued_at=exp.queued_at, started_at=exp.started_at,
            finished_at=exp.finished_at, decided_at=exp.decided_at,
            wait_seconds=_seconds(exp.queued_at, exp.started_at),
            run_seconds=_seconds(exp.started_at, exp.finished_at)))


def add_candidate(session: Session, *, program: Program, body: schemas.CandidateCreate) -> Experiment:
    """Validate a person's patch exactly as an LLM's is (farm.candidates.record_proposal).

    The parent is the program's current head. The caller rolls back an invalid result: the person
    sees the reason in the response, and a typo should not be shown to the LLM as a failed idea.
    """
    edit = Edit(search_replace=body.search_replace, unified_diff=body.unified_diff, files=dict(body.files or {}))
    return record_proposal(session, program, parent_commit=program.head_commit or program.root_commit or "",
                           base_files=head_files(session, program), edit=edit, proposer_kind="manual",
                           description=body.description, rationale=body.rationale)


# ---------------------------------------------------------------- workers and metrics

def list_workers(session: Session, *, heartbeat_interval: float,
                 ids: Sequence[str] | None = None) -> list[schemas.WorkerPublic]:
    now = db_now(session)
    stmt = (select(Worker, Experiment.program_id, Experiment.description, Experiment.progress,
                   Experiment.current_loss)
            .outerjoin(Experiment, Experiment.id == Worker.current_experiment_id)
            .order_by(Worker.host, Worker.gpu_index.nulls_last(), Worker.id))
    if ids is not None:
        stmt = stmt.where(Worker.id.in_(list(ids)))
    out = []
    for w, program_id, description, progress, loss in session.execute(stmt):
        age = max(0.0, (now - as_utc(w.last_heartbeat)).total_seconds())
        state: Literal["alive", "stale", "stopped"] = (
            "stopped" if w.stopped_at is not None
            else "alive" if age <= stale_after(heartbeat_interval, w.heartbeat_interval) else "stale")
        out.append(schemas.WorkerPublic(
            id=w.id, host=w.host, hw_class=w.hw_class, gpu_index=w.gpu_index, gpu_name=w.gpu_name,
            gpu_memory_mb=w.gpu_memory_mb, driver_version=w.driver_version, torch_version=w.torch_version,
            cuda_version=w.cuda_version, sandbox=w.sandbox, sandbox_ok=w.sandbox_ok, state=state, last_heartbeat=w.last_heartbeat,
            seconds_since_heartbeat=round(age, 3), current_experiment_id=w.current_experiment_id,
            current_program_id=program_id, current_description=description, progress=progress,
            current_loss=loss))
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(value: float) -> str:
    """A sample value in full: `:g` kept 6 digits (1,234,567 calls read 1.23457e+06, $1234.5678 read 1234.57, and a
    counter stopped moving for small increments)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def metrics_text(session: Session, *, heartbeat_interval: float) -> str:
    """Prometheus text exposition (version 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            text = _sample(value)
            lines.append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")

    slugs = dict(session.execute(select(Program.id, Program.slug)).all())
    by_status = session.execute(select(Experiment.program_id, Experiment.status, func.count())
                                .group_by(Experiment.program_id, Experiment.status)).all()
    family("farm_experiments", "gauge", "Experiments by program and status.",
           [({"program": slugs.get(p, str(p)), "status": s.value}, float(n)) for p, s, n in by_status])
    # a paused program's queued runs wait for its resume, not for a worker (farm/states.py HELD_PROGRAMS)
    queued = session.execute(select(Experiment.hw_class, func.count())
                             .join(Program, Program.id == Experiment.program_id)
                             .where(Experiment.status == ExperimentStatus.queued,
                                    Program.status.not_in(HELD_PROGRAMS))
                             .group_by(Experiment.hw_class)).all()
    family("farm_queue_depth", "gauge", "Queued experiments waiting for a worker, by hardware class.",
           [({"hw_class": h}, float(n)) for h, n in queued])
    workers = list_workers(session, heartbeat_interval=heartbeat_interval)
    alive = [w for w in workers if w.state == "alive"]
    busy = [w for w in alive if w.current_experiment_id is not None]
    family("farm_workers", "gauge", "Workers by state (alive: heartbeat within 2 x interval).",
           [({"state": s}, float(sum(1 for w in workers if w.state == s))) for s in ("alive", "stale", "stopped")])
    family("farm_workers_busy", "gauge", "Alive workers running an experiment.", [({}, float(len(busy)))])
    family("farm_worker_utilisation", "gauge", "Busy share of alive workers (0..1).",
           [({}, len(busy) / len(alive) if alive else 0.0)])
    spend = session.execute(select(LLMCall.program_id, func.coalesce(func.sum(LLMCall.cost_usd), 0.0),
                                   func.count()).group_by(LLMCall.program_id)).all()
    family("farm_llm_spend_usd_total", "counter", "LLM spend in US dollars, by program.",
           [({"program": slugs.get(p, "none") if p else "none"}, float(c)) for p, c, _ in spend])
    family("farm_llm_calls_total", "counter", "LLM calls, by program.",
           [({"program": slugs.get(p, "none") if p else "none"}, float(n)) for p, _, n in spend])
    return "\n".join(lines) + "\n"
