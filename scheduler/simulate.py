"""A simulated landscape for the policy: true effects plus Gaussian seed noise.

Each trial is one program state: the head run `baseline_runs` times, one candidate with a true
effect (negative = better val_bpb), judged by `policy.judge` exactly as the scheduler does,
including the confirmation runs it asks for. Used by tests/unit/test_policy.py and bench/policy.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scheduler.policy import PRIOR_DOF, PolicyConfig, judge, noise_sigma


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


def program_sigma(cfg: PolicyConfig, rng: random.Random, *, candidates: int, sigma: float,
                  effects: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, -1.0, -2.0, -4.0),
                  head_true: float = 1.0, prior_dof: float = PRIOR_DOF) -> tuple[float, float]:
    """(sigma, degrees of freedom) as the scheduler measures it at the end of a program of `candidates` candidates
    (true effects drawn from `effects`, in sigmas), pooling the baselines and every candidate run more than once
    with its confirmations; kept candidates become the parent. Confirmations are asked for the candidates whose
    screening run looked good, so the screening run is a selected draw: the pooled spread is biased upward.
    `prior_dof`: the weight of cfg.prior_sigma in the final estimate (0: the data's own)."""
    parent = [rng.gauss(head_true, sigma) for _ in range(cfg.baseline_runs)]
    groups = [parent]
    for _ in range(candidates):
        true = head_true + rng.choice(effects) * sigma
        runs = [rng.gauss(true, sigma)]
        while True:
            est, _ = noise_sigma(groups + ([runs] if len(runs) > 1 else []), prior=cfg.prior_sigma)
            verdict = judge(cfg, runs, parent, est)
            if verdict.action != "confirm" or len(runs) > 1 + cfg.confirm_runs + 1:
                break
            runs.append(rng.gauss(true, sigma))
        if len(runs) > 1:
            groups.append(runs)
        if verdict.action == "keep":
            parent, head_true = runs, true
    return noise_sigma(groups, prior=cfg.prior_sigma, prior_dof=prior_dof)
