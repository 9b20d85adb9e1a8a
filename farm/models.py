"""The farm's schema: SQLAlchemy 2 typed models, shared by every service and by Alembic.

One owner per piece of state: the `experiments` row owns an experiment's lifecycle status, the
`results` table holds at most one outcome per experiment (a unique key, so a duplicate delivery
can never write a second result), `programs.head_commit` mirrors the git branch head (the
scheduler writes both, see farm/lineage.py) and `decisions` is the append-only audit log.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import DateTime as DateTimeType

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class utcnow(FunctionElement[datetime]):
    """The database's own clock, in UTC, as a timezone-aware timestamp.

    Staleness (heartbeats, reaping) is decided with this, never with a worker's clock, so a host
    whose clock runs ahead cannot make a live worker look dead or a dead one look alive.
    """

    type = DateTimeType(timezone=True)
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _pg_utcnow(element: utcnow, compiler: Any, **kw: Any) -> str:
    # clock_timestamp(), not now(): now() is frozen at the start of the transaction
    return "clock_timestamp()"


@compiles(utcnow, "sqlite")
def _sqlite_utcnow(element: utcnow, compiler: Any, **kw: Any) -> str:
    # the same text layout SQLAlchemy's SQLite DateTime writes, so comparisons stay lexical-safe
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=24,
                values_callable=lambda e: [m.value for m in e], validate_strings=True)


def _ts() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=utcnow(), nullable=False)


class ProgramStatus(enum.StrEnum):
    active = "active"
    paused = "paused"
    stopped = "stopped"
    finished = "finished"


class ExperimentStatus(enum.StrEnum):
    proposed = "proposed"
    invalid = "invalid"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    crashed = "crashed"
    timed_out = "timed_out"
    refused = "refused"  # tampered harness or forged result
    lost = "lost"  # worker vanished and the retry limit is spent
    cancelled = "cancelled"  # never ran: its program was stopped (or finished) first

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({ExperimentStatus.succeeded, ExperimentStatus.crashed, ExperimentStatus.timed_out,
                               ExperimentStatus.refused, ExperimentStatus.lost, ExperimentStatus.invalid,
                               ExperimentStatus.cancelled})


class ExperimentRole(enum.StrEnum):
    baseline = "baseline"  # the head re-run to measure the noise floor
    candidate = "candidate"  # a proposed change, screening run
    confirmation = "confirmation"  # a promising candidate re-run on another seed


class Decision(enum.StrEnum):
    keep = "keep"
    discard = "discard"


class Program(Base):
    __tablename__ = "programs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    instructions: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(String(200), default="default")
    # sha256 over the template's fixed files when the program was created: a worker whose copy
    # of the harness differs refuses to run the program's candidates
    template_digest: Mapped[str | None] = mapped_column(String(64))
    editable_files: Mapped[list[Any]] = mapped_column(default=lambda: ["train.py"])
    profile: Mapped[str] = mapped_column(String(32), default="cpu")
    hw_class: Mapped[str] = mapped_column(String(64), default="cpu")
    time_budget: Mapped[float] = mapped_column(Float)
    proposer: Mapped[dict[str, Any]] = mapped_column(default=dict)
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stop_rules: Mapped[dict[str, Any]] = mapped_column(default=dict)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    status: Mapped[ProgramStatus] = mapped_column(_enum(ProgramStatus, "program_status"),
                                                  default=ProgramStatus.active)
    status_reason: Mapped[str | None] = mapped_column(Text)
    branch: Mapped[str] = mapped_column(String(200))
    root_commit: Mapped[str | None] = mapped_column(String(64))
    head_commit: Mapped[str | None] = mapped_column(String(64))
    head_experiment_id: Mapped[int | None] = mapped_column(
        ForeignKey("experiments.id", use_alter=True, ondelete="SET NULL"))
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=utcnow(),
                                                 onupdate=utcnow(), nullable=False)

    __table_args__ = (
        CheckConstraint("time_budget > 0", name="time_budget_positive"),
        CheckConstraint("weight > 0", name="weight_positive"),
    )

    experiments: Mapped[list[Experiment]] = relationship(
        back_populates="program", foreign_keys="Experiment.program_id", passive_deletes=True)


_UNIQUE_WHERE = "replicate_of IS NULL AND role <> 'baseline' AND content_hash IS NOT NULL"


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"), index=True)
    role: Mapped[ExperimentRole] = mapped_column(_enum(ExperimentRole, "experiment_role"),
                                                 default=ExperimentRole.candidate)
    parent_commit: Mapped[str] = mapped_column(String(64))
    commit_sha: Mapped[str | None] = mapped_column(String(64))
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)  # editable file name -> full text
    diff: Mapped[str] = mapped_column(Text, default="")
    content_hash: Mapped[str | None] = mapped_column(String(64))
    proposer_kind: Mapped[str] = mapped_column(String(32))  # llm | mutation | manual | baseline | repair | replay
    description: Mapped[str] = mapped_column(Text, default="")
    rationale: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(Integer, default=0)
    replicate_of: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"), index=True)
    repair_of: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    hw_class: Mapped[str] = mapped_column(String(64))
    status: Mapped[ExperimentStatus] = mapped_column(_enum(ExperimentStatus, "experiment_status"),
                                                     default=ExperimentStatus.proposed, index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)  # invalid / crash / refusal reason
    decision: Mapped[Decision | None] = mapped_column(_enum(Decision, "decision"))
    # a run its change's decision set aside as a broken measurement (scheduler/policy.py): no longer counted as a
    # run of its commit, neither in a head's mean nor in the noise estimate
    set_aside: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[list[Any]] = mapped_column(default=list)  # history of lost/retried attempts
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    progress: Mapped[float | None] = mapped_column(Float)  # percent of the budget
    current_loss: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _ts()
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # exact duplicates never run twice; replicates of one change legitimately share its content
        Index("uq_experiments_program_content", "program_id", "content_hash", unique=True,
              postgresql_where=text(_UNIQUE_WHERE),
              sqlite_where=text(_UNIQUE_WHERE)),
        Index("ix_experiments_program_status", "program_id", "status"),
        # read paths of the API and dashboard (migrations 0002, 0005): a program's newest page, its baselines,
        # its keeps, its last hour, and the runs of a parent commit
        Index("ix_experiments_program_id_id", "program_id", "id"),
        Index("ix_experiments_program_role", "program_id", "role"),
        Index("ix_experiments_program_decision", "program_id", "decision"),
        Index("ix_experiments_program_finished", "program_id", "finished_at"),
        Index("ix_experiments_program_created", "program_id", "created_at"),
        Index("ix_experiments_commit_sha", "commit_sha"),
        Index("ix_experiments_parent_commit", "parent_commit"),
        CheckConstraint("retry_count >= 0", name="retry_count_nonnegative"),
        CheckConstraint("decision IS NULL OR status = 'succeeded'", name="decision_needs_success"),
    )

    program: Mapped[Program] = relationship(back_populates="experiments", foreign_keys=[program_id])
    result: Mapped[Result | None] = relationship(back_populates="experiment", uselist=False,
                                                 passive_deletes=True)


class Result(Base):
    """The one outcome of an experiment's run (unique per experiment: a second report is refused)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), unique=True)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[ExperimentStatus] = mapped_column(_enum(ExperimentStatus, "result_outcome"))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    val_bpb: Mapped[float | None] = mapped_column(Float)
    test_bpb: Mapped[float | None] = mapped_column(Float)
    training_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float | None] = mapped_column(Float)
    startup_seconds: Mapped[float | None] = mapped_column(Float)
    eval_seconds: Mapped[float | None] = mapped_column(Float)
    peak_vram_mb: Mapped[float | None] = mapped_column(Float)
    mfu_percent: Mapped[float | None] = mapped_column(Float)
    total_tokens_m: Mapped[float | None] = mapped_column(Float)
    num_steps: Mapped[int | None] = mapped_column(Integer)
    num_params_m: Mapped[float | None] = mapped_column(Float)
    depth: Mapped[int | None] = mapped_column(Integer)
    gpu_name: Mapped[str | None] = mapped_column(String(200))
    hw_class: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # setup/startup/report seconds
    log_tail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _ts()

    __table_args__ = (Index("ix_results_val_bpb", "val_bpb"),)  # best-so-far walks this index

    experiment: Mapped[Experiment] = relationship(back_populates="result")


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:gpuN or host:cpuN
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer)
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    gpu_name: Mapped[str | None] = mapped_column(String(200))
    gpu_memory_mb: Mapped[float | None] = mapped_column(Float)
    driver_version: Mapped[str | None] = mapped_column(String(64))
    hw_class: Mapped[str] = mapped_column(String(64))
    torch_version: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    sandbox: Mapped[str] = mapped_column(String(200), default="none")
    sandbox_ok: Mapped[bool] = mapped_column(Boolean, default=False)
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # jobs it holds at once
    # its FARM_HEARTBEAT_INTERVAL: a reaper or dashboard set to a shorter one waits as long as this worker beats
    heartbeat_interval: Mapped[float | None] = mapped_column(Float)
    current_experiment_id: Mapped[int | None] = mapped_column(
        ForeignKey("experiments.id", use_alter=True, ondelete="SET NULL"))
    started_at: Mapped[datetime] = _ts()
    last_heartbeat: Mapped[datetime] = _ts()
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DecisionRecord(Base):
    """Append-only audit of each keep/discard, with every number the policy used."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"), index=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), unique=True)
    decision: Mapped[Decision] = mapped_column(_enum(Decision, "decision_value"))
    policy: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    head_before: Mapped[str | None] = mapped_column(String(64))
    head_after: Mapped[str | None] = mapped_column(String(64))
    statistics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _ts()


class LLMCall(Base):
    __tablename__ = "llm_calls"

    id: Mapped[int] = mapped_column(primary_key=True)
    program_id: Mapped[int | None] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"), index=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(32), default="propose")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _ts()


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = _ts()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


