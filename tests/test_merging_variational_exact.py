"""The variational (Wilson-prior) posterior against brute-force integration of the exact
posterior: prior(J) x prod_i N(I_i | J, s_i^2) on J >= 0, integrated with scipy quad."""

import math

import numpy as np
import pytest

from dials_vmerge.merging.variational import posterior_moments
from scipy import integrate  # after dials_vmerge (cctbx first)


def brute_force_posterior(intensity, sigma, centric, prior_mean):
    """E J, SD J, E sqrt(J), SD sqrt(J) by adaptive quadrature of the unnormalised posterior
    written directly from the prior and the per-observation Gaussians. Integrated in
    u = sqrt(J) (dJ = 2u du), where every integrand is smooth at the J = 0 boundary."""
    intensity = np.atleast_1d(intensity)
    sigma = np.atleast_1d(sigma)

    def log_density(J):
        if centric:  # Gamma(1/2, scale 2 prior_mean); its J^(-1/2) cancels the 2u of dJ
            log_prior = -J / (2 * prior_mean)
        else:  # exponential with mean prior_mean
            log_prior = -J / prior_mean
        return log_prior - 0.5 * float(np.sum(((intensity - J) / sigma) ** 2))

    def jacobian(u):
        return 2.0 if centric else 2.0 * u

    precision = float(np.sum(sigma**-2.0))
    width = 1 / math.sqrt(precision)
    centre = float(np.sum(intensity / sigma**2)) / precision
    hi = max(centre, 0.0) + 40 * width + (40 * prior_mean if centre < 10 * width else 0.0)
    # scales where the posterior mass may sit: near the centre, or near 0 with the
    # exponential scale width^2/|centre| when the measurements are negative
    scales = [width, max(centre, 0.0) + width]
    if centre < 0:
        scales.append(width * width / -centre)
    breaks = sorted({math.sqrt(k * x) for x in scales for k in (0.1, 1.0, 10.0) if 0 < k * x < hi})
    u_grid = np.linspace(0, math.sqrt(hi), 4001)[1:]
    u_grid = np.concatenate([u_grid, breaks])
    peak = max(log_density(u * u) + math.log(jacobian(u)) for u in u_grid)
    options = dict(epsabs=0, epsrel=1e-12, limit=2000, points=breaks)

    def moment(fn):
        return integrate.quad(
            lambda u: fn(u) * jacobian(u) * math.exp(log_density(u * u) - peak),
            0.0, math.sqrt(hi), **options)[0]

    norm = moment(lambda u: 1.0)
    mean = moment(lambda u: u * u) / norm
    var = moment(lambda u: (u * u - mean) ** 2) / norm
    mean_f = moment(lambda u: u) / norm
    var_f = moment(lambda u: (u - mean_f) ** 2) / norm
    return mean, math.sqrt(var), mean_f, math.sqrt(var_f)


CASES = [
    # (intensities in units of sigma, sigma, prior mean)
    ([-10.0], [1.0], 1.0),
    ([-5.0], [1.0], 1.0),
    ([-10.0], [2.0], 30.0),
    ([-5.0, -4.0, -6.0], [1.0, 0.5, 2.0], 3.0),
    ([0.0], [1.0], 0.1),
    ([0.3], [1.0], 10.0),
    ([2.0], [1.0], 1.0),
    ([4.9], [1.0], 5.0),
    ([5.1, 4.0], [1.0, 1.5], 5.0),
    ([50.0], [1.0], 40.0),
    ([1000.0, 990.0, 1012.0], [5.0, 4.0, 9.0], 500.0),
]


@pytest.mark.parametrize("centric", [False, True])
@pytest.mark.parametrize("intensity,sigma,prior_mean", CASES)
def test_posterior_matches_quadrature(intensity, sigma, prior_mean, centric):
    intensity = np.array(intensity) * np.array(sigma)
    ours = posterior_moments(intensity, sigma, centric, prior_mean)
    reference = brute_force_posterior(intensity, np.array(sigma), centric, prior_mean)
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_random_groups_match_quadrature():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        centric = bool(rng.integers(0, 2))
        prior_mean = 10 ** rng.uniform(-1, 3)
        sigma = 10 ** rng.uniform(-0.5, 1, size=n)
        level = rng.choice([-10.0, -5.0, 0.0, 1.0]) * sigma.mean() + rng.choice([0.0, prior_mean])
        intensity = rng.normal(level, sigma)
        ours = posterior_moments(intensity, sigma, centric, prior_mean)
        reference = brute_force_posterior(intensity, sigma, centric, prior_mean)
        np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_amplitudes_never_negative_or_nan():
    for centric in (False, True):
        for i_over_sigma in np.concatenate([-np.logspace(-2, 3, 40), [0.0], np.logspace(-2, 5, 40)]):
            for prior_mean in (1e-3, 1.0, 1e4):
                mean_j, sd_j, mean_f, sd_f = posterior_moments([i_over_sigma], [1.0], centric, prior_mean)
                values = np.array([mean_j, sd_j, mean_f, sd_f])
                assert np.all(np.isfinite(values)), (centric, i_over_sigma, prior_mean, values)
                assert mean_j > 0 and mean_f > 0 and sd_j >= 0 and sd_f >= 0
