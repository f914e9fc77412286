"""Measurement noise: counting statistics with background, outliers, error-model inflation.

For each observation the raw (uncorrected) expected counts are
    S_full = K g J qe / lp    (profile fitting estimates the full intensity)
    S      = S_full p         (summation records the partial intensity)
with K the overall counts scale, g the true inverse scale, J the true intensity, p the
partiality. Summation integration is simulated with Poisson foreground and background
counts; profile fitting as a Gaussian estimate of S_full with the smaller background term a
fitted profile achieves, correlated with the summation noise. Reported variances are the
estimates an integration program would give (from the observed counts), so I/sigma falls with
resolution as the true intensities do.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from .. import flags as dials_flags

FOREGROUND_PIXELS_PER_IMAGE = 20.0
BACKGROUND_TO_FOREGROUND_PIXELS = 4.0
# A fitted profile weights pixels by the expected signal, which shrinks the background
# contribution to the variance (relative to summation).
PRF_BACKGROUND_EFFICIENCY = 0.6
PRF_SUM_CORRELATION = 0.9
OUTLIER_POSITIVE_FRACTION = 0.8

INTEGRATED_FLAGS = (
    dials_flags.predicted | dials_flags.indexed | dials_flags.integrated_sum
    | dials_flags.integrated_prf
)


def pixel_counts(z_lo, z_hi):
    n_frames = np.maximum(1.0, np.ceil(z_hi) - np.floor(z_lo))
    n_fg = FOREGROUND_PIXELS_PER_IMAGE * n_frames
    return n_fg, BACKGROUND_TO_FOREGROUND_PIXELS * n_fg


def _prf_background_variance(n_fg, n_bg, background):
    return PRF_BACKGROUND_EFFICIENCY * n_fg * background * (1.0 + n_fg / n_bg)


def expected_i_over_sigma(unit_signal, partiality, n_fg, n_bg, background, counts_scale):
    """Expected profile-fitted I/sigma for counts scale K (unit_signal = g J qe / lp)."""
    s_full = counts_scale * unit_signal
    variance = (s_full * partiality + _prf_background_variance(n_fg, n_bg, background))
    return s_full * partiality / np.sqrt(variance)


def calibrate_counts_scale(unit_signal, partiality, n_fg, n_bg, background, target):
    """K such that the mean expected I/sigma equals `target` (bisection in log K)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        value = expected_i_over_sigma(unit_signal, partiality, n_fg, n_bg, background,
                                      np.exp(mid)).mean()
        if value < target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def simulate_measurements(rng, unit_signal, partiality, z_lo, z_hi, counts_scale, settings):
    """Raw summation and profile intensities with their reported variances.

    Returns (i_sum, v_sum, i_prf, v_prf, prf_ok, is_outlier).
    """
    n = len(unit_signal)
    background = settings.background_per_pixel
    n_fg, n_bg = pixel_counts(z_lo, z_hi)
    s_full = counts_scale * unit_signal
    s = s_full * partiality
    fg = rng.poisson(s + n_fg * background).astype(float)
    bg = rng.poisson(n_bg * background).astype(float)
    background_estimate = bg / n_bg
    i_sum = fg - n_fg * background_estimate
    v_sum = fg + n_fg * n_fg * background_estimate / n_bg
    true_v_sum = s + n_fg * background + n_fg * n_fg * background / n_bg
    z_sum = (i_sum - s) / np.sqrt(true_v_sum)

    true_v_prf = (s + _prf_background_variance(n_fg, n_bg, background)) / partiality ** 2
    rho = PRF_SUM_CORRELATION
    z_prf = rho * z_sum + np.sqrt(1 - rho * rho) * rng.standard_normal(n)
    i_prf = s_full + np.sqrt(true_v_prf) * z_prf
    v_prf = (np.maximum(i_prf * partiality, 0.0)
             + _prf_background_variance(n_fg, n_bg, background_estimate)) / partiality ** 2

    # Error-model inflation: the true spread is a^2 (sigma^2 + (b I)^2), reported sigma is not.
    a, b = settings.error_model_a, settings.error_model_b
    extra = rng.standard_normal(n)
    i_sum = s + a * (i_sum - s) + a * b * s * extra
    i_prf = s_full + a * (i_prf - s_full) + a * b * s_full * extra

    is_outlier = rng.random(n) < settings.outlier_fraction
    size = 4.0 + 12.0 * rng.random(n)
    sign = np.where(rng.random(n) < OUTLIER_POSITIVE_FRACTION, 1.0, -1.0)
    i_sum = np.where(is_outlier, i_sum + sign * size * np.sqrt(np.maximum(v_sum, 1.0)), i_sum)
    i_prf = np.where(is_outlier, i_prf + sign * size * np.sqrt(np.maximum(v_prf, 1.0)), i_prf)

    prf_ok = rng.random(n) >= settings.prf_failure_fraction
    i_prf = np.where(prf_ok, i_prf, 0.0)
    v_prf = np.where(prf_ok, v_prf, 0.0)
    return i_sum, v_sum, i_prf, v_prf, prf_ok, is_outlier


def truncated_normal_mean(centre, sigma, lo, hi):
    """Mean of N(centre, sigma) restricted to [lo, hi]: the centroid of a partial piece."""
    alpha = (lo - centre) / sigma
    beta = (hi - centre) / sigma
    mass = ndtr(beta) - ndtr(alpha)
    density = (np.exp(-0.5 * alpha * alpha) - np.exp(-0.5 * beta * beta)) / np.sqrt(2 * np.pi)
    mean = centre + sigma * density / np.maximum(mass, 1e-300)
    return np.clip(mean, lo, hi)
