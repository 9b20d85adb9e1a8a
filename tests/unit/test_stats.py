"""Noise statistics: pooled sigma from replicate groups, by values and by moments."""

from __future__ import annotations

import math

from farm.stats import pooled_from_moments, pooled_sigma, sigma_from_statistics


def test_pooled_sigma_ignores_singletons_and_shifted_means():
    sigma, dof = pooled_sigma([[1.000, 1.004], [0.990, 0.992], [0.5]])
    assert dof == 2 and math.isclose(sigma, math.sqrt((8e-6 + 2e-6) / 2))
    assert pooled_sigma([[1.0], []]) == (None, 0)


def test_moments_agree_with_values():
    groups = [[0.9979, 1.0001, 0.9990], [0.9851, 0.9870]]
    rows = [(len(g), sum(g), sum(x * x for x in g)) for g in groups]
    a, b = pooled_sigma(groups), pooled_from_moments(rows)
    assert a[1] == b[1] == 3 and math.isclose(a[0], b[0], rel_tol=1e-6)


def test_sigma_from_statistics():
    assert sigma_from_statistics({"sigma": 0.002}) == 0.002
    assert sigma_from_statistics({"noise_sigma": 0.001}) == 0.001
    assert sigma_from_statistics({"sigma": "x"}) is None and sigma_from_statistics(None) is None
    assert sigma_from_statistics({"sigma": float("nan")}) is None


def test_the_noise_shown_is_the_latest_decisions_that_used_one(sqlite_url):
    """Found by review: the dashboard's sigma read only the latest decision; a decision that used none (a parent
    with no successful run, another hardware class) made it fall back to the raw pooled replicates."""
    from sqlalchemy.orm import Session

    from farm import migrate
    from farm.db import make_engine
    from farm.models import Decision, DecisionRecord, ExperimentRole, Result
    from farm.models import ExperimentStatus as S
    from farm.stats import program_noise
    from tests.factories import make_experiment, make_program

    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with Session(engine) as s:
            p = make_program(s)
            for v in (1.000, 1.004):  # two baseline runs of the head: pooled, sigma 0.00283
                e = make_experiment(s, p, status=S.succeeded, role=ExperimentRole.baseline, parent_commit="a" * 40)
                s.add(Result(experiment_id=e.id, outcome=S.succeeded, val_bpb=v))
            for sha, stats in (("b", {"sigma": 0.0021, "dof": 3, "runs": [1.003]}), ("c", {"runs": [1.01]}),
                               ("d", {})):
                e = make_experiment(s, p, status=S.succeeded, parent_commit="a" * 40, commit_sha=sha * 40,
                                    decision=Decision.discard)
                s.add(Result(experiment_id=e.id, outcome=S.succeeded, val_bpb=1.003))
                s.add(DecisionRecord(program_id=p.id, experiment_id=e.id, decision=Decision.discard, policy="confirm",
                                     statistics=stats))
            s.flush()
            noise = program_noise(s, p.id)
            assert (noise.sigma, noise.dof, noise.source) == (0.0021, 3, "decisions")
    finally:
        engine.dispose()
