"""Research programs: creating one, and reading its current head.

A program's git branch is created by the scheduler (the only writer of the farm repository); until
then `head_commit` is empty and the head files are the template's editable files.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.harness import FIXED_DIR, FIXED_FILE, fixed_files, harness_checksum
from farm.models import Experiment, ExperimentRole, Program, ProgramStatus
from farm.templates import editable_files, template_dir

# hardware profiles the harness knows, with the default time budget (seconds of training)
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"time_budget": 20.0, "hw_class": "cpu"},
    "h100": {"time_budget": 300.0, "hw_class": "gpu.h100"},
}

DEFAULT_POLICY: dict[str, Any] = {
    "kind": "confirm",  # confirm | greedy
    "baseline_runs": 2,  # head re-runs that measure the noise floor
    "k_sigma": 2.0,  # a candidate must beat the head by max(k x sigma, min_delta)
    "min_delta": 0.0,
    "confirm_runs": 1,  # extra seeds for a promising candidate
    "min_val_bpb": 0.3,  # sanity floor: lower is held for confirmation, never kept on one run
    "max_jump": 0.1,  # an improvement larger than this is held for confirmation
    "max_repairs": 2,
}


SLUG_TRIES = 6  # the last one with a random suffix


class ProgramError(ValueError):
    pass


RESERVED_SLUGS = frozenset({"new", "live"})


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80].rstrip("-")  # no dash left by the cut
    if not slug:
        raise ProgramError("the program name must contain a letter or digit")
    # every lookup reads an all-digit reference as an id, and the dashboard's /ui/programs/new and /ui/programs/live
    # come before /ui/programs/{slug}: such a slug would be unreachable
    if slug.isdigit() or slug in RESERVED_SLUGS:
        slug = f"p-{slug}"
    return slug


def unique_slug(session: Session, name: str, *, random_suffix: bool = False) -> str:
    base = slugify(name)
    if random_suffix:
        return f"{base}-{secrets.token_hex(4)}"
    slug, n = base, 1
    while session.execute(select(Program.id).where(Program.slug == slug)).first() is not None:
        n += 1
        slug = f"{base}-{n}"
    return slug


def create_program(session: Session, *, name: str, instructions: str, profile: str = "cpu",
                   time_budget: float | None = None, hw_class: str | None = None,
                   editable: list[str] | None = None, proposer: dict[str, Any] | None = None,
                   policy: dict[str, Any] | None = None, stop_rules: dict[str, Any] | None = None,
                   weight: float = 1.0, template: str = "default") -> Program:
    if profile not in PROFILES:
        raise ProgramError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    root = template_dir(template)
    editable = list(editable or ["train.py"])
    # the worker refuses every candidate that changes the harness, so a program allowed to edit it could never
    # advance: refuse it here, where the person can still fix the request
    harness = sorted(set(editable) & set(fixed_files(root)))
    if harness:
        raise ProgramError(f"editable_files may not name the template's fixed harness: {', '.join(harness)} "
                           f"(the harness is {FIXED_FILE} and {FIXED_DIR}/)")
    editable_files(template, editable)  # raises if a name is not in the template
    merged_policy = {**DEFAULT_POLICY, **(policy or {})}
    if merged_policy["kind"] not in ("confirm", "greedy"):
        raise ProgramError("policy.kind must be 'confirm' or 'greedy'")
    values: dict[str, Any] = dict(
        name=name.strip(), instructions=instructions, template=template,
        # the worker's own definition of the harness (prepare.py + kernels/*.py), so that documentation
        # files in the template (README.md) cannot make every run of the program refused
        template_digest=harness_checksum(template_dir(template)), editable_files=editable, profile=profile,
        hw_class=hw_class or PROFILES[profile]["hw_class"],
        time_budget=float(time_budget or PROFILES[profile]["time_budget"]),
        proposer=dict(proposer or {}), policy=merged_policy, stop_rules=dict(stop_rules or {}),
        weight=weight, status=ProgramStatus.active)
    # Requests for one name at the same moment all see the same free slug, and the unique index refuses
    # all but one: the others take the next free suffix. Each round lets at least one through, so a
    # burst larger than the tries ends on a random suffix rather than an error.
    for attempt in range(SLUG_TRIES):
        slug = unique_slug(session, name, random_suffix=attempt == SLUG_TRIES - 1)
        program = Program(**values, slug=slug, branch=f"research/{slug}")
        try:
            with session.begin_nested():
                session.add(program)
                session.flush()
            return program
        except IntegrityError:
            if attempt == SLUG_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def head_files(session: Session, program: Program) -> dict[str, str]:
    """The editable files at the program's current head: the kept experiment's, else the root commit's as its
    baseline runs hold them, else (no branch yet: the scheduler makes the root commit from it) the template's. Not
    the template on disk once the root exists: a template changed since (a farm upgrade) would have a person's patch
    checked against files its commit's parent does not hold (found by review)."""
    if program.head_experiment_id is not None:
        exp = session.get(Experiment, program.head_experiment_id)
        if exp is not None and exp.files:
            return dict(exp.files)
    if program.head_commit:
        files = session.execute(
            select(Experiment.files).where(Experiment.program_id == program.id,
                                           Experiment.role == ExperimentRole.baseline,
                                           Experiment.commit_sha == program.head_commit)
            .order_by(Experiment.id).limit(1)).scalar_one_or_none()
        if files:
            return dict(files)
    return editable_files(program.template, list(program.editable_files))
