"""Keep rates of the policies on a simulated landscape (true effect + Gaussian noise, sigma 0.002).

    python bench/policy.py [--trials 2000]

Prints, per policy and true effect (in sigmas), the share of candidates kept and the training runs
spent per candidate. A null effect measures false keeps; 4 sigma measures power. Then the noise the policy
measures at the end of a simulated program, against the true sigma.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.policy import PRIOR_DOF, PolicyConfig  # noqa: E402
from scheduler.simulate import keep_rate, program_sigma  # noqa: E402

SIGMA = 0.002
# true effects of a program's candidates, in sigmas: a mix (3 in 7 null), then one effect throughout
LANDSCAPES = ((0.0, 0.0, 0.0, 1.0, -1.0, -2.0, -4.0), (0.0,), (-1.0,), (-2.0,), (-4.0,))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--programs", type=int, default=100)
    ap.add_argument("--program-candidates", type=int, default=200)
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
    # the noise the policy measures over a whole program, where a candidate is confirmed because its first run looked
    # good (a selected draw): how far from the true sigma the pooled estimate lands, on its own (no prior) and as
    # the policy uses it (shrunk toward prior_sigma, here equal to the truth)
    cfg = PolicyConfig(kind="confirm")
    print(f"\nsigma measured at the end of a program of {args.program_candidates} candidates, confirm k=2, "
          f"mean of {args.programs} programs (true sigma {SIGMA})")
    print(f"{'true effects (sigmas)':<36}{'data alone':>14}{'with prior':>14}{'dof':>7}")
    for effects in LANDSCAPES:
        row = []
        for prior_dof in (0.0, PRIOR_DOF):
            rng = random.Random(args.seed)
            ests = [program_sigma(cfg, rng, candidates=args.program_candidates, sigma=SIGMA, effects=effects,
                                  prior_dof=prior_dof) for _ in range(args.programs)]
            mean_sigma = statistics.fmean(e for e, _ in ests)
            row.append(f"{(mean_sigma / SIGMA - 1) * 100:+.1f} %")
        dof = statistics.fmean(d for _, d in ests)
        label = ", ".join(f"{e:+g}" for e in sorted(set(effects), reverse=True)) if len(set(effects)) > 1 \
            else f"all {effects[0]:+g}"
        print(f"{label:<36}{row[0]:>14}{row[1]:>14}{dof:>7.1f}")

if __name__ == "__main__":
    main()
