"""Regression: a mutation draw that changes nothing (a value already at its clamp) must not end the
proposal. It used to escape MutationProposer.propose, and since the proposer's seed only moves when
an experiment is added, the program stalled for good ("no perturbation changed a value" every 30 s,
seen in the farm-up integration test)."""

from __future__ import annotations

from scheduler.mutation import MutationProposer
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
