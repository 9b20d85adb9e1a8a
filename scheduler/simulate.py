"""A simulated landscape for the policy: true effects plus Gaussian seed noise.

Each trial is one program state: the head run `baseline_runs` times, one candidate with a true
effect (negative = better val_bpb), judged by `policy.judge` exactly as the scheduler does,
including the confirmation runs it asks for. Used by tests/unit/test_policy.py and bench/policy.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scheduler.policy import PolicyConfig, judge, noise_sigma


@dataclass(frozen=True)
class SimOutcome:
    kept: int
    trials: int
    runs: int  # total training runs spent on candidates (screening + confirmations)

    @property
    def rate(self) -> float:
        return self.kept / self.trials


def trial(cfg: PolicyConfig, rng: random.Random, *, effect: float, sigma: float,
          head_true: float = 1.0) -> tuple[bool, int]:
    """(kept, candidate runs) for one candidate whose true val_bpb is head_true + effect."""
    base = [rng.gauss(head_true, sigma) for _ in range(cfg.baseline_runs)]
    runs = [rng.gauss(head_true + effect, sigma)]
    while True:
        est, _ = noise_sigma([base, runs], prior=cfg.prior_sigma)
        verdict = judge(cfg, runs, base, est)
        if verdict.action != "confirm":
            return verdict.action == "keep", len(runs)
        if len(runs) > 1 + cfg.confirm_runs + 1:  # the policy never asks for more; guard the loop
            return False, len(runs)
        runs.append(rng.gauss(head_true + effect, sigma))


def keep_rate(cfg: PolicyConfig, *, effect: float, sigma: float = 0.002, trials: int = 200,
              seed: int = 0) -> SimOutcome:
    rng = random.Random(seed)
    kept = spent = 0
    for _ in range(trials):
        k, n = trial(cfg, rng, effect=effect, sigma=sigma)
        kept += k
        spent += n
    return SimOutcome(kept, trials, spent)
