"""Regressions: the mutation proposer must not stall a program. A draw that changes nothing (a value already
at its clamp) must not end the proposal: it used to escape MutationProposer.propose, and since the
proposer's seed only moves when an experiment is added, the program stalled for good ("no perturbation
changed a value" every 30 s, seen in the farm-up integration test). Nor may a retry of the same context
repeat the same draws, nor a head whose single changes are all known run out of proposals."""

from __future__ import annotations

import random
from pathlib import Path

from farm.candidates import content_hash
from scheduler.mutation import MutationProposer, _fmt, find_hyperparameters, perturb
from scheduler.proposers import ProposalContext

# one hyperparameter whose every perturbation is a no-op half the time: FRAC at 0.0 can only move up
SOURCE = "FINAL_LR_FRAC = 0.0  # clamp at 0\nWARMUP_RATIO = 1.0  # clamp at 1\nprint(FINAL_LR_FRAC)\n"


def test_a_draw_that_changes_nothing_is_drawn_again() -> None:
    prop = MutationProposer()
    for seed in range(200):
        ctx = ProposalContext(program_id=1, slug="p", profile="cpu", instructions="", head_commit="b" * 40,
                              head_files={"train.py": SOURCE}, editable=["train.py"], seed=seed)
        proposal = prop.propose(ctx)  # never raises for a source that has a movable value
        assert proposal.edit.files["train.py"] != SOURCE


TEMPLATE = (Path(__file__).resolve().parents[2] / "training_template" / "train.py").read_text()


def _single_change_neighbours(source: str, profile: str) -> frozenset[str]:
    """The content hash of every source one perturbation away (each rule draws from a handful of choices)."""
    out = {content_hash({"train.py": source})}
    lines = source.splitlines(keepends=True)
    for hp in find_hyperparameters(source, profile):
        for i in range(300):
            new = perturb(hp, random.Random(i))
            if new is None:
                continue
            line = lines[hp.line]
            changed = [*lines[:hp.line], line[:hp.start] + _fmt(new, hp.is_int) + line[hp.end:], *lines[hp.line + 1:]]
            out.add(content_hash({"train.py": "".join(changed)}))
    return frozenset(out)


def test_a_head_whose_single_changes_are_all_known_still_gets_a_proposal() -> None:
    """Once every single-change neighbour of the head was tried, 4.4 % of seeds found nothing new in 30 draws
    (two values changed only by chance) and raised; the scheduler retried the same seed, so they stalled."""
    known = _single_change_neighbours(TEMPLATE, "cpu")
    prop = MutationProposer()
    for seed in range(150):
        ctx = ProposalContext(program_id=7, slug="p", profile="cpu", instructions="", head_commit="c" * 40,
                              head_files={"train.py": TEMPLATE}, editable=["train.py"], known_hashes=known,
                              seed=seed)
        proposal = prop.propose(ctx)
        assert content_hash({"train.py": proposal.edit.files["train.py"]}) not in known


def test_a_retried_context_draws_anew() -> None:
    """A ProposerError adds no experiment, so the next call gets the same context: it must not repeat the draws
    that failed (a new MutationProposer is made for every call, as the scheduler does)."""
    ctx = ProposalContext(program_id=8, slug="p", profile="cpu", instructions="", head_commit="d" * 40,
                          head_files={"train.py": TEMPLATE}, editable=["train.py"], seed=3)
    first = MutationProposer().propose(ctx).description
    retries = {MutationProposer().propose(ctx).description for _ in range(4)}
    assert retries - {first}, f"every retry proposed {first!r} again"


def test_log_every_is_not_a_hyperparameter() -> None:
    """train.py only prints every LOG_EVERY steps: a run that changes it measures nothing."""
    for profile in ("cpu", "h100"):
        assert "LOG_EVERY" not in {hp.name for hp in find_hyperparameters(TEMPLATE, profile)}
