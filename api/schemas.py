"""Request and response bodies: `XCreate` what a client sends, `XPublic` what the API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from farm.db import as_utc
from farm.models import Decision, ExperimentRole, ExperimentStatus, ProgramStatus


def _clean_text(value: str) -> str:
    # Postgres text cannot hold NUL, and lone surrogates cannot be encoded: refuse both as 422s
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return value


# Text fields are `Annotated[str, Field(...), CLEAN]`, the constraints before the validator: placed after it
# (`Annotated[Annotated[str, CLEAN], Field(min_length=1)]`) they are checked on its result as a generic sized value,
# and an empty name was answered "Value should have at least 1 item after validation" (found by review)
CLEAN = AfterValidator(_clean_text)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


NOT_BLANK = AfterValidator(_not_blank)


def _distinct(values: list[str]) -> list[str]:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"names a file more than once: {', '.join(twice)}")
    return values

# Every datetime the API returns, in UTC with its offset. SQLite hands back naive values (stored as UTC)
# and Postgres aware ones: without this the same field read "2026-11-27T17:08:40.642000" on one backend
# and "...+00:00" on the other, and a browser or client takes the naive form for local time.
UTCDateTime = Annotated[datetime, AfterValidator(as_utc)]


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        _clean_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _clean_text(str(k))
            _clean_json(v)
    elif isinstance(value, list):
        for v in value:
            _clean_json(v)
    return value


# ---------------------------------------------------------------- errors

class ErrorPublic(BaseModel):
    detail: str = Field(description="One line saying what was wrong (for a 422: which field and why).",
                        examples=["body.name: Field required"])
    errors: list[dict[str, Any]] | None = Field(default=None, description="Every validation error (422 only).")


# ---------------------------------------------------------------- programs

class PolicyConfig(BaseModel):
    """The keep/discard policy (the scheduler's); unset fields take the farm's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["confirm", "greedy"] | None = Field(default=None, description="confirm: re-run promising "
                                                      "candidates on other seeds; greedy: keep if strictly lower")
    baseline_runs: int | None = Field(default=None, ge=0, le=50, description="head re-runs measuring the noise")
    k_sigma: float | None = Field(default=None, ge=0, le=100, description="required margin in noise sigmas")
    min_delta: float | None = Field(default=None, ge=0, le=10, description="required margin in bpb")
    confirm_runs: int | None = Field(default=None, ge=0, le=50)
    min_val_bpb: float | None = Field(default=None, ge=0, le=100, description="sanity floor")
    max_jump: float | None = Field(default=None, ge=0, le=100, description="larger improvements need confirmation")
    prior_sigma: float | None = Field(default=None, gt=0, le=1, description="noise (bpb) assumed before the "
                                      "replicated runs measure it")
    max_repairs: int | None = Field(default=None, ge=0, le=20)


class ProposerConfig(BaseModel):
    """Who proposes candidates; unset fields take the farm's settings (FARM_LLM_*)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["llm", "mutation", "manual"] | None = Field(default=None, description="manual: only people")
    model: Annotated[str, Field(max_length=200), CLEAN] | None = Field(default=None, examples=["openai/gpt-4o-mini"])
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_in_flight: int | None = Field(default=None, ge=1, le=1000, description="at most this many of the "
                                      "program's runs queued or running at once, proposer calls included")


class StopRules(BaseModel):
    """When the program finishes on its own (any rule reached)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_experiments: int | None = Field(default=None, ge=1, le=10_000_000)
    max_hours: float | None = Field(default=None, gt=0, le=100_000)
    max_spend_usd: float | None = Field(default=None, ge=0, le=1_000_000)
    deadline: datetime | None = Field(default=None, description="no new candidates after this time (ISO 8601)")
    target_val_bpb: float | None = Field(default=None, ge=0, le=100)

    @field_validator("deadline")
    @classmethod
    def _deadline_in_utc(cls, value: datetime | None) -> datetime | None:
        # an offset within hours of datetime's range ("9999-12-31T23:00:00-12:00") has no UTC form: taken, it made
        # the scheduler's conversion raise on every pass (found by review). A naive time is kept, read as UTC.
        if value is None or value.tzinfo is None:
            return value
        try:
            return as_utc(value)
        except OverflowError:
            raise ValueError("out of range: in UTC it would fall outside the years 1 to 9999") from None


class ProgramCreate(BaseModel):
    # NaN was answered "Input should be less than or equal to 1000" (found by review): say it must be finite
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{
        "name": "Tiny LR sweep", "instructions": "# Goal\nLower val_bpb by tuning the learning rates.\n",
        "profile": "cpu", "editable_files": ["train.py"], "policy": {"kind": "confirm", "k_sigma": 2.0},
        "stop_rules": {"max_experiments": 100}, "weight": 1.0}]})

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"[A-Za-z0-9]",
                               description="Shown everywhere; the slug and git branch derive from it"), CLEAN]
    instructions: Annotated[str, Field(min_length=1, max_length=200_000,
                                       description="The research program (markdown) the proposer follows"), CLEAN,
                            NOT_BLANK]
    profile: Literal["cpu", "h100"] = Field(default="cpu", description="Hardware profile: sets the default "
                                            "time budget and hardware class")
    time_budget: float | None = Field(default=None, gt=0, le=86_400,
                                      description="Training seconds per run (default: the profile's)")
    hw_class: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$"), CLEAN] | None = (
        Field(default=None, description="Queue the runs go to (default: the profile's), e.g. cpu, gpu.h100"))
    editable_files: Annotated[list[Annotated[str, Field(min_length=1, max_length=200), CLEAN]],
                              AfterValidator(_distinct)] = Field(
        default_factory=lambda: ["train.py"], min_length=1, max_length=20,
        description="Template files the proposer may change; every other file is the fixed harness")
    template: Annotated[str, Field(min_length=1, max_length=200), CLEAN] = "default"
    proposer: ProposerConfig = Field(default_factory=ProposerConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    stop_rules: StopRules = Field(default_factory=StopRules)
    weight: float = Field(default=1.0, gt=0, le=1000, description="Share of the farm relative to other programs")


class ProgramPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    slug: str
    status: ProgramStatus
    status_reason: str | None
    profile: str
    hw_class: str
    time_budget: float
    template: str
    editable_files: list[str]
    proposer: dict[str, Any]
    policy: dict[str, Any]
    stop_rules: dict[str, Any]
    weight: float
    branch: str
    head_commit: str | None
    created_at: UTCDateTime


class BestPublic(BaseModel):
    experiment_id: int
    commit: str | None
    val_bpb: float
    test_bpb: float | None
    description: str


class ProgramSummary(ProgramPublic):
    """A program with the figures the lists show."""

    counts: dict[str, int] = Field(description="Experiments by status", examples=[{"succeeded": 12, "running": 2}])
    best: BestPublic | None
    baseline_val_bpb: float | None


class ProgramDetail(ProgramSummary):
    instructions: str
    root_commit: str | None
    head_experiment_id: int | None
    noise_sigma: float | None = Field(description="Seed-to-seed standard deviation of val_bpb")
    noise_source: str = Field(description="decisions (the policy's figure), replicates (pooled) or none")
    decisions: dict[str, int] = Field(description="Experiments by decision", examples=[{"keep": 3, "discard": 9}])
    llm_spend_usd: float
    llm_calls: int
    experiments_per_hour: float = Field(description="Runs finished in the last hour (database clock)")


# ---------------------------------------------------------------- experiments

class ExperimentPublic(BaseModel):
    id: int
    program_id: int
    role: ExperimentRole
    status: ExperimentStatus
    status_reason: str | None
    decision: Decision | None
    description: str
    proposer_kind: str
    parent_commit: str
    commit_sha: str | None
    seed: int
    val_bpb: float | None
    test_bpb: float | None
    parent_val_bpb: float | None = Field(description="Mean val_bpb of the parent commit's runs")
    delta: float | None = Field(description="val_bpb minus the parent's (negative is better)")
    set_aside: bool = Field(default=False, description="Set aside by its change's decision as a broken measurement: "
                            "not counted as a run of its commit (docs/policy.md)")
    memory_gb: float | None
    worker_id: str | None
    progress: float | None
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None


class ExperimentPage(BaseModel):
    items: list[ExperimentPublic]
    total: int = Field(description="Experiments matching the filters, on every page")
    limit: int
    offset: int
    before_id: int | None = Field(default=None, description="The cursor this page was asked for")
    next_before_id: int | None = Field(default=None, description="Pass as `before_id` for the next (older) "
                                       "page; null on the last page, and for any order but newest first")


class MetricsPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    outcome: ExperimentStatus
    exit_code: int | None
    reason: str | None
    val_bpb: float | None
    test_bpb: float | None
    training_seconds: float | None
    total_seconds: float | None
    startup_seconds: float | None
    eval_seconds: float | None
    peak_vram_mb: float | None
    mfu_percent: float | None
    total_tokens_m: float | None
    num_steps: int | None
    num_params_m: float | None
    depth: int | None
    gpu_name: str | None
    hw_class: str | None
    timings: dict[str, Any]


class DecisionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    decision: Decision
    policy: str
    reason: str
    head_before: str | None
    head_after: str | None
    statistics: dict[str, Any]
    created_at: UTCDateTime


class TimingsPublic(BaseModel):
    created_at: UTCDateTime
    queued_at: UTCDateTime | None
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    decided_at: UTCDateTime | None
    wait_seconds: float | None = Field(description="queued -> started")
    run_seconds: float | None = Field(description="started -> finished")


class ExperimentDetail(ExperimentPublic):
    rationale: str
    diff: str = Field(description="Unified diff against the parent's files")
    retry_count: int
    attempts: list[Any]
    current_loss: float | None
    heartbeat_at: UTCDateTime | None
    metrics: MetricsPublic | None
    decision_record: DecisionPublic | None
    log_tail: str
    worker: WorkerPublic | None
    timings: TimingsPublic


class CandidateCreate(BaseModel):
    """A person's own patch, in exactly one of three formats, validated like an LLM's."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "description": "halve the batch size",
        "search_replace": "train.py\n<<<<<<< SEARCH\nTOTAL_BATCH_SIZE = 2**19\n=======\n"
                          "TOTAL_BATCH_SIZE = 2**18\n>>>>>>> REPLACE\n"}]})

    description: Annotated[str, Field(min_length=1, max_length=2000), CLEAN, NOT_BLANK]
    rationale: Annotated[str, Field(max_length=8000), CLEAN] = ""
    unified_diff: Annotated[str, Field(min_length=1, max_length=500_000), CLEAN] | None = None
    search_replace: Annotated[str, Field(min_length=1, max_length=500_000), CLEAN] | None = None
    files: dict[Annotated[str, Field(min_length=1, max_length=200), CLEAN],
                Annotated[str, Field(max_length=500_000), CLEAN]] | None = Field(
        default=None, max_length=20, description="Whole new contents of editable files")

    @model_validator(mode="after")
    def _exactly_one(self) -> CandidateCreate:
        given = [k for k in ("unified_diff", "search_replace", "files") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of unified_diff, search_replace or files")
        return self


# ---------------------------------------------------------------- workers, health

class WorkerPublic(BaseModel):
    id: str
    host: str
    hw_class: str
    gpu_index: int | None
    gpu_name: str | None
    gpu_memory_mb: float | None
    driver_version: str | None = Field(description="NVIDIA driver, as nvidia-smi reported it at registration")
    torch_version: str | None = Field(description="The worker's torch, as it reported at registration")
    cuda_version: str | None = Field(description="The CUDA version torch was built with")
    sandbox: str = Field(description="What the worker's start-up probe got (bwrap, unshare, none) and, "
                         "for anything but bubblewrap, why")
    sandbox_ok: bool = Field(description="false: candidates on this worker run without the full "
                             "bubblewrap sandbox (see sandbox for why)")
    state: Literal["alive", "stale", "stopped"] = Field(
        description="alive: heartbeat within 2 x the interval (database clock)")
    last_heartbeat: UTCDateTime
    seconds_since_heartbeat: float
    current_experiment_id: int | None
    current_program_id: int | None
    current_description: str | None
    progress: float | None = Field(description="Percent of the current run's budget")
    current_loss: float | None


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    broker: str


ExperimentDetail.model_rebuild()
