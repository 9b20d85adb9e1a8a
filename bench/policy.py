"""Keep rates of the policies on a simulated landscape (true effect + Gaussian noise, sigma 0.002).

    python bench/policy.py [--trials 2000]

Prints, per policy and true effect (in sigmas), the share of candidates kept and the training runs
spent per candidate. A null effect measures false keeps; 4 sigma measures power.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.policy import PolicyConfig  # noqa: E402
from scheduler.simulate import keep_rate  # noqa: E402

SIGMA = 0.002


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    policies = {"greedy": PolicyConfig(kind="greedy"), "confirm (k=2)": PolicyConfig(kind="confirm"),
                "confirm (k=3)": PolicyConfig(kind="confirm", k_sigma=3.0)}
    effects = [0.0, -1.0, -2.0, -3.0, -4.0, +1.0]
    print(f"sigma={SIGMA}  trials={args.trials}  baseline_runs=2  (effect in sigmas; negative = better)")
    print(f"{'policy':<16}" + "".join(f"{e:>+14.0f}" for e in effects))
    for name, cfg in policies.items():
        cells = []
        for e in effects:
            out = keep_rate(cfg, effect=e * SIGMA, sigma=SIGMA, trials=args.trials, seed=args.seed)
            cells.append(f"{out.rate * 100:6.1f}% {out.runs / out.trials:4.2f}r")
        print(f"{name:<16}" + "".join(f"{c:>14}" for c in cells))
    print("cells: keep rate, training runs per candidate")


if __name__ == "__main__":
    main()
