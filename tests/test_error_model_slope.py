"""The analytic slope d cost / d b of the error model's profile likelihood
(kernels.error_model_ml.cost_slope_kernel) against central differences of the cost kernel,
and the polished b: a stationary point of the cost, no further from Brent's b than Brent's
accuracy (scaling.error_model._polish_stationary_point)."""

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.kernels.error_model_ml import a_sq_and_cost_kernel, cost_slope_kernel
from dials_vmerge.scaling import error_model as em


def simulated_groups(seed=3, n_groups=400, a=1.2, b=0.04):
    """Groups of 2-6 observations with sigma'^2 = a^2 (sigma^2 + (b I)^2), in group order."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 7, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    truth = rng.exponential(400.0, n_groups)[group] + 30.0
    g = rng.uniform(0.6, 1.4, group.size)
    variance = truth * g * g * rng.uniform(0.5, 1.5, group.size)
    sd = a * np.sqrt(variance + (b * truth * g) ** 2)
    intensity = truth * g + sd * rng.normal(size=group.size)
    weight = 1.0 / variance
    u = weight * g * g
    share = u / np.bincount(group, u)[group]
    ih = (np.bincount(group, weight * g * intensity) / np.bincount(group, u))[group]
    residual_sq = (intensity / g - ih) ** 2
    return intensity, variance, g, share, group, residual_sq, n_groups, ih


@pytest.mark.parametrize("fixed_a_sq", [-1.0, 1.7])
@pytest.mark.parametrize("b", [0.005, 0.04, 0.2])
def test_slope_equals_central_difference(b, fixed_a_sq):
    intensity, variance, g, share, group, residual_sq, n_groups, _ = simulated_groups()
    n = intensity.size

    def cost(x):
        return a_sq_and_cost_kernel(intensity, variance, g, share, group, residual_sq,
                                    n_groups, x, fixed_a_sq, np.empty(n))[1]

    h = 1e-5 * b
    numeric = (cost(b + h) - cost(b - h)) / (2.0 * h)
    analytic = cost_slope_kernel(intensity, variance, g, share, group, residual_sq, n_groups,
                                 b, fixed_a_sq, np.empty(n), np.empty(n))
    # central difference error ~ h^2 f''' and rounding ~ eps |cost| / h
    assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3 * abs(cost(b)) / b)


def test_refined_b_is_a_stationary_point_near_brent():
    intensity, variance, g, share, group, residual_sq, n_groups, ih = simulated_groups()
    data = em.ErrorModelData(intensity, variance, g, ih, np.bincount(group)[group] * 1.0,
                             ih * g, np.zeros(group.size, np.int64), 1, None, share, group)
    a, b = em.refine_maximum_likelihood(data)
    n = intensity.size
    slope = cost_slope_kernel(intensity, variance, g, share, group, residual_sq, n_groups,
                              b, -1.0, np.empty(n), np.empty(n))
    curvature = (cost_slope_kernel(intensity, variance, g, share, group, residual_sq,
                                   n_groups, b * 1.001, -1.0, np.empty(n), np.empty(n))
                 - slope) / (b * 0.001)
    assert curvature > 0  # a minimum
    assert abs(slope / curvature) < 1e-12 * b  # the slope's zero to ~eps, not Brent's sqrt
    assert 0.02 < b < 0.06 and 1.1 < a < 1.3  # near the simulated a = 1.2, b = 0.04
