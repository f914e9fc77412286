"""Student-t robust merging: efficiency on Gaussian errors (quadrature and simulation), sigma
calibration, small groups."""

import math

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (cctbx before scipy)
from dials_vmerge.merging.groups import GroupedObservations
from dials_vmerge.merging.robust import asymptotic_rms_ratio, merge_robust


def _ratio_gauss_hermite(dof, scale, n_nodes=200):
    """RMS(t location)/RMS(mean) for N(0,1) errors: sqrt(E[psi^2]) / E[psi'] by
    Gauss-Hermite quadrature (independent of the adaptive quadrature in the module)."""
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)  # weight exp(-x^2/2)
    w = w / math.sqrt(2 * math.pi)
    k = dof * scale**2
    psi = x / (k + x * x)
    dpsi = (k - x * x) / (k + x * x) ** 2
    return math.sqrt(np.sum(w * psi**2)) / np.sum(w * dpsi)


@pytest.mark.parametrize("scale, expected", [(1.0, 1.039), (1.25, 1.023), (1.5, 1.014),
                                             (2.0, 1.006)])
def test_asymptotic_rms_ratio_by_quadrature(scale, expected):
    by_hermite = _ratio_gauss_hermite(4.0, scale)
    assert by_hermite == pytest.approx(expected, abs=5e-4)
    assert asymptotic_rms_ratio(4.0, scale) == pytest.approx(by_hermite, rel=1e-8)


def _equal_groups(n_groups, n_per_group):
    start = np.arange(n_groups + 1, dtype=np.int64) * n_per_group
    return GroupedObservations(
        permutation=np.arange(n_groups * n_per_group, dtype=np.int64), group_start=start,
        asu_index=np.zeros((n_groups, 3), np.int32), centric=np.zeros(n_groups, bool),
        epsilon=np.ones(n_groups), dstar_sq=np.ones(n_groups), anomalous=False)


def test_kernel_efficiency_and_sigma_calibration_on_gaussian_errors():
    rng = np.random.default_rng(7)
    n_groups, n = 20000, 40
    groups = _equal_groups(n_groups, n)
    sigma = rng.uniform(0.5, 2.0, size=n_groups * n)
    intensity = rng.normal(0.0, sigma)  # true value 0 everywhere
    weights = 1 / sigma**2
    group = np.repeat(np.arange(n_groups), n)
    weighted_mean = np.bincount(group, weights * intensity) / np.bincount(group, weights)
    for scale in (1.0, 1.5):
        robust = merge_robust(groups, intensity, sigma, dof=4, sigma_scale=scale)
        ratio = math.sqrt(np.mean(robust.intensity**2) / np.mean(weighted_mean**2))
        # Monte Carlo error of the ratio ~0.002 (the two estimates are strongly correlated)
        assert ratio == pytest.approx(asymptotic_rms_ratio(4, scale), abs=0.006)
        # calibrated sigma: normalised errors have unit RMS, sigma a little above classical
        assert np.sqrt(np.mean((robust.intensity / robust.sigma) ** 2)) == pytest.approx(
            1.0, abs=0.02)
        classical_sigma = 1 / np.sqrt(np.bincount(group, weights))
        assert np.median(robust.sigma / classical_sigma) == pytest.approx(
            asymptotic_rms_ratio(4, scale), abs=0.02)  # J fluctuates at n = 40
        assert not robust.extra["sigma_fallback"].any()


def test_small_groups_keep_the_weighted_mean_and_its_sigma():
    groups = GroupedObservations(
        permutation=np.arange(3, dtype=np.int64), group_start=np.array([0, 1, 3], np.int64),
        asu_index=np.zeros((2, 3), np.int32), centric=np.zeros(2, bool), epsilon=np.ones(2),
        dstar_sq=np.ones(2), anomalous=False)
    merged = merge_robust(groups, np.array([5.0, 1.0, 100.0]), np.array([2.0, 1.0, 2.0]))
    # hand-computed: one observation; two observations with weights 1 and 1/4
    np.testing.assert_allclose(merged.intensity, [5.0, (1.0 + 100.0 / 4) / 1.25], rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, [2.0, 1 / math.sqrt(1.25)], rtol=1e-12)


def test_outlier_dominated_group_gets_finite_sigma():
    # three equal-sigma observations, two far apart: the t-likelihood is flat or concave
    groups = _equal_groups(1, 3)
    merged = merge_robust(groups, np.array([0.0, 0.1, 60.0]), np.ones(3))
    assert abs(merged.intensity[0] - 0.05) < 0.5  # the outlier is down-weighted
    assert np.isfinite(merged.sigma[0]) and merged.sigma[0] > 0
