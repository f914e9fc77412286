"""The error model's profile-likelihood kernel (kernels/error_model_ml.py) against the numpy
formula of refine_maximum_likelihood's docstring, recomputed here."""

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba)
from dials_vmerge.kernels.error_model_ml import a_sq_and_cost_kernel


def numpy_a_sq_and_cost(intensity, variance, g, share, group, residual_sq, n_groups, b,
                        fixed_a=None):
    q = (variance + (b * intensity) ** 2) / (g * g)
    spread = np.bincount(group, share * share * q, minlength=n_groups)[group]
    unit = np.maximum(q * (1.0 - 2.0 * share) + spread, 1e-300)
    ratio = residual_sq / unit
    a_sq = float(np.mean(ratio)) if fixed_a is None else float(fixed_a) ** 2
    return a_sq, float(np.sum(np.log(a_sq * unit)) + np.sum(ratio) / a_sq)


@pytest.mark.parametrize("b", [0.0, 0.003, 0.05, 0.4])
@pytest.mark.parametrize("fixed_a", [None, 1.7])
def test_kernel_equals_numpy_formula(b, fixed_a):
    rng = np.random.default_rng(11)
    n, n_groups = 50_000, 9_000
    intensity = rng.gamma(1.0, 200.0, n) - 5.0
    variance = np.abs(intensity) + rng.uniform(1.0, 20.0, n)
    g = rng.uniform(0.4, 2.5, n)
    group = rng.integers(0, n_groups, n)
    share = rng.uniform(0.0, 0.6, n)
    residual_sq = rng.normal(0.0, 4.0, n) ** 2
    expected = numpy_a_sq_and_cost(intensity, variance, g, share, group, residual_sq,
                                   n_groups, b, fixed_a)
    got = a_sq_and_cost_kernel(intensity, variance, g, share, group, residual_sq, n_groups, b,
                               -1.0 if fixed_a is None else fixed_a ** 2, np.empty(n))
    # sums in row order (kernel) vs numpy's pairwise sums: rounding only
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    assert got[1] == pytest.approx(expected[1], rel=1e-12)
