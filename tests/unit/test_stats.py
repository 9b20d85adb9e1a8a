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
