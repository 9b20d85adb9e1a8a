"""The one proposer interface: a context in, a proposal (description, rationale, edit) out.

A proposer never touches the database: the scheduler builds the context, calls `propose` (LLM
calls on a thread pool, mutation inline) and hands the result to farm.candidates.record_proposal,
like any manual patch, so every candidate is validated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from farm.candidates import Checked, Edit


class ProposerError(RuntimeError):
    """The proposer could not produce an answer (transport failure, spend cap); nothing is recorded."""


class ProposerRefused(ProposerError):
    """The provider refused the call in a way another attempt cannot change (a bad key, an unknown model): the
    scheduler pauses a program whose calls it refuses several times in a row."""


@dataclass(frozen=True)
class HistoryItem:
    experiment_id: int
    role: str
    proposer: str
    description: str
    status: str  # invalid | crashed | keep | discard | running | ...
    val_bpb: float | None = None
    delta: float | None = None  # parent mean - val_bpb (positive = better)
    reason: str | None = None


@dataclass(frozen=True)
class ProposalContext:
    program_id: int
    slug: str
    profile: str
    instructions: str
    head_commit: str
    head_files: dict[str, str]
    editable: list[str]
    history: list[HistoryItem] = field(default_factory=list)
    sigma: float | None = None
    head_val_bpb: float | None = None
    known_hashes: frozenset[str] = frozenset()
    seed: int = 0
    # a repair: the crashed experiment, its diff and its traceback tail
    repair_of: int | None = None
    repair_diff: str = ""
    repair_log: str = ""


@dataclass
class Proposal:
    description: str
    rationale: str
    edit: Edit
    llm_call_ids: list[int] = field(default_factory=list)
    raw: str = ""
    checked: Checked | None = None  # the edit checked against the context's head files (set by the scheduler)
    # what was wrong with the answer besides its edit (an LLM answer cut off at max_tokens): record_proposal puts it
    # first in the reason an invalid proposal is stored with, whatever files the edit is checked against there
    defect: str | None = None


class Proposer(Protocol):
    kind: str
    inline: bool  # cheap and offline: run in the scheduler's thread

    def propose(self, ctx: ProposalContext) -> Proposal: ...


def describe(config: dict[str, Any]) -> str:
    return str(config.get("kind") or ("llm" if config.get("model") else "mutation"))
