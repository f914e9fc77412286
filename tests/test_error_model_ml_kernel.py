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


@pytest.mark.parametrize("b", [0.0, 0.003, 0.05, 0.4])
@pytest.mark.parametrize("fixed_a", [None, 1.7])
def test_slope_kernel_equals_numpy_formula(b, fixed_a):
    """cost_slope_kernel (its second pass reads q, q' back from the scratch) against
    sum u'/u - sum r^2 u'/u^2 / a^2 in numpy, a clamped unit (u' = 0) included."""
    from dials_vmerge.kernels.error_model_ml import cost_slope_kernel

    rng = np.random.default_rng(12)
    n, n_groups = 50_000, 9_000
    intensity = rng.gamma(1.0, 200.0, n) - 5.0
    variance = np.abs(intensity) + rng.uniform(1.0, 20.0, n)
    g = rng.uniform(0.4, 2.5, n)
    group = rng.integers(0, n_groups, n)
    weight = rng.uniform(0.1, 1.0, n)
    share = weight / np.bincount(group, weight, minlength=n_groups)[group]  # sums to 1
    residual_sq = rng.normal(0.0, 4.0, n) ** 2
    # a group of one: q (1 - 2p) + p^2 q = 0, clamped to 1e-300 with u' = 0
    lone = np.flatnonzero(np.bincount(group, minlength=n_groups)[group] == 1)[0]
    residual_sq[lone] = 0.0
    q = (variance + (b * intensity) ** 2) / (g * g)
    dq = 2.0 * b * intensity * intensity / (g * g)
    raw = q * (1.0 - 2.0 * share) + np.bincount(group, share * share * q,
                                                minlength=n_groups)[group]
    du = dq * (1.0 - 2.0 * share) + np.bincount(group, share * share * dq,
                                                minlength=n_groups)[group]
    du = np.where(raw >= 1e-300, du, 0.0)
    unit = np.maximum(raw, 1e-300)
    a_sq = float(np.mean(residual_sq / unit)) if fixed_a is None else fixed_a ** 2
    # / unit / unit as the kernel: unit ** 2 of the clamped 1e-300 underflows to 0
    expected = np.sum(du / unit) - np.sum(residual_sq * du / unit / unit) / a_sq
    got = cost_slope_kernel(intensity, variance, g, share, group, residual_sq, n_groups, b,
                            -1.0 if fixed_a is None else fixed_a ** 2, np.empty(n), np.empty(n))
    scale = np.sum(np.abs(du / unit)) + np.sum(residual_sq * np.abs(du) / unit / unit) / a_sq
    assert abs(got - expected) <= 1e-12 * max(scale, 1.0)
    assert raw[lone] == 0.0


def test_refinement_evaluates_each_b_once(monkeypatch):
    """refine_maximum_likelihood memoises the sums per b: a^2 at the end, at Brent's b, is
    not evaluated a second time."""
    import dials_vmerge.kernels.error_model_ml as kernels
    from dials_vmerge.scaling import error_model as em

    rng = np.random.default_rng(3)
    n_groups, a, b = 2000, 1.2, 0.04
    group = np.repeat(np.arange(n_groups), rng.integers(2, 7, n_groups))
    truth = rng.exponential(400.0, n_groups)[group] + 30.0
    g = rng.uniform(0.6, 1.4, group.size)
    variance = truth * g * g * rng.uniform(0.5, 1.5, group.size)
    intensity = truth * g + a * np.sqrt(variance + (b * truth * g) ** 2) * rng.normal(
        size=group.size)
    u = g * g / variance
    share = u / np.bincount(group, u)[group]
    ih = (np.bincount(group, g * intensity / variance) / np.bincount(group, u))[group]
    data = em.ErrorModelData(intensity, variance, g, ih, np.ones(group.size), ih * g,
                             np.zeros(group.size, np.int64), 1, None, share, group)
    expected = em.refine_maximum_likelihood(data)
    seen = []
    kernel = kernels.a_sq_and_cost_kernel

    def counted(*args):
        seen.append(args[7])
        return kernel(*args)

    monkeypatch.setattr(kernels, "a_sq_and_cost_kernel", counted)
    assert em.refine_maximum_likelihood(data) == expected
    assert len(seen) == len(set(seen)) > 5
    assert 0.02 < expected[1] < 0.06 and 1.1 < expected[0] < 1.3
