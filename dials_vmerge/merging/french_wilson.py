"""French-Wilson amplitudes from merged intensities, following DIALS's implementation.

Per reflection: h = I/sigma - sigma/<I> (acentric) or I/sigma - sigma/(2<I>) (centric),
where <I> is epsilon times the mean of I/epsilon in its resolution bin. Reflections with
I/sigma < -3.7 or h < -4 get no amplitude (NaN). For h below 3 (acentric) or 4 (centric) the
posterior J, sigma(J), F, sigma(F) are interpolated in the tables of French & Wilson (1978),
read as data from cctbx-base; above that the normal approximation J = h sigma, F = sqrt(J),
sigma(F) = sigma / (2F). With fewer than `min_reflections` reflections the flat-prior
formula F = sqrt((I + sqrt(I^2 + 2 sigma^2)) / 2) is used instead.

Difference from DIALS, by design: DIALS estimates the bin mean intensity with a
standardised-median estimator; we use the bin mean of I/epsilon (unbiased under zero-mean
noise, which matters in the weak shells). Bins: equal counts in d*^3, at most 60 bins and
at least 20 reflections per bin, interpolated linearly in d*^3 between bin centres.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

MIN_I_OVER_SIGMA = -3.7
MIN_H = -4.0
MAX_BINS = 60
MIN_PER_BIN = 20
DEFAULT_MIN_REFLECTIONS = 200


def _tables():
    from cctbx import french_wilson as tables  # the 1978 supplement values, used as data

    acentric = np.array([tables.ac_zj, tables.ac_zj_sd, tables.ac_zf, tables.ac_zf_sd])
    centric = np.array([tables.c_zj, tables.c_zj_sd, tables.c_zf, tables.c_zf_sd])
    return acentric, centric


ACENTRIC_TABLE, CENTRIC_TABLE = _tables()  # rows: J, sd(J), F, sd(F) in units of sigma


def mean_intensity_by_resolution(intensity, epsilon, dstar_sq) -> np.ndarray:
    """<I> for each reflection: epsilon x the binned mean of I/epsilon, interpolated in d*^3."""
    n = len(intensity)
    if n == 0:
        return np.zeros(0)
    dstar_cubed = np.asarray(dstar_sq) ** 1.5
    order = np.argsort(dstar_cubed, kind="stable")
    n_bins = max(1, min(MAX_BINS, n // MIN_PER_BIN))
    bin_members = np.array_split(order, n_bins)
    centres = np.array([dstar_cubed[m].mean() for m in bin_members])
    normalised = np.asarray(intensity) / np.asarray(epsilon)
    means = np.array([normalised[m].mean() for m in bin_members])
    # A bin whose mean is not positive (noise only) borrows the smallest positive mean.
    positive = means[means > 0]
    floor = positive.min() if len(positive) else max(np.abs(normalised).mean(), 1e-12)
    means = np.where(means > 0, means, floor)
    return np.asarray(epsilon) * np.interp(dstar_cubed, centres, means)


@njit(cache=True)
def _interpolate_table(table, h):
    point = 10.0 * (h + 4.0)
    lower = int(point)
    if lower >= table.shape[1] - 1:
        lower = table.shape[1] - 2
    delta = point - lower
    return (
        table[0, lower] + delta * (table[0, lower + 1] - table[0, lower]),
        table[1, lower] + delta * (table[1, lower + 1] - table[1, lower]),
        table[2, lower] + delta * (table[2, lower + 1] - table[2, lower]),
        table[3, lower] + delta * (table[3, lower + 1] - table[3, lower]),
    )


@njit(cache=True, parallel=True)
def french_wilson_kernel(intensity, sigma, mean_intensity, centric, acentric_table, centric_table):
    n = intensity.shape[0]
    J = np.full(n, np.nan)
    sigma_J = np.full(n, np.nan)
    F = np.full(n, np.nan)
    sigma_F = np.full(n, np.nan)
    for i in prange(n):
        s = sigma[i]
        if not (s > 0.0) or not (mean_intensity[i] > 0.0):
            continue
        i_over_s = intensity[i] / s
        if centric[i]:
            h = i_over_s - s / (2.0 * mean_intensity[i])
            h_table_max = 4.0
        else:
            h = i_over_s - s / mean_intensity[i]
            h_table_max = 3.0
        if i_over_s < MIN_I_OVER_SIGMA or h < MIN_H:
            continue
        if h < h_table_max:
            if centric[i]:
                zj, zj_sd, zf, zf_sd = _interpolate_table(centric_table, h)
            else:
                zj, zj_sd, zf, zf_sd = _interpolate_table(acentric_table, h)
            root_s = np.sqrt(s)
            J[i] = zj * s
            sigma_J[i] = zj_sd * s
            F[i] = zf * root_s
            sigma_F[i] = zf_sd * root_s
        else:
            J[i] = h * s
            sigma_J[i] = s
            F[i] = np.sqrt(J[i])
            sigma_F[i] = 0.5 * s / F[i]
    return J, sigma_J, F, sigma_F


@njit(cache=True, parallel=True)
def flat_prior_kernel(intensity, sigma):
    n = intensity.shape[0]
    F = np.full(n, np.nan)
    sigma_F = np.full(n, np.nan)
    for i in prange(n):
        s = sigma[i]
        if not (s > 0.0):
            continue
        I = intensity[i]
        F[i] = np.sqrt(0.5 * (I + np.sqrt(I * I + 2.0 * s * s)))
        sigma_F[i] = 0.5 * s / F[i]
    return F, sigma_F


def french_wilson(
    intensity, sigma, centric, epsilon, dstar_sq, min_reflections=DEFAULT_MIN_REFLECTIONS
):
    """(J, sigma_J, F, sigma_F) per reflection; NaN where French-Wilson rejects."""
    intensity = np.ascontiguousarray(intensity, dtype=np.float64)
    sigma = np.ascontiguousarray(sigma, dtype=np.float64)
    if len(intensity) < min_reflections:
        F, sigma_F = flat_prior_kernel(intensity, sigma)
        return intensity.copy(), sigma.copy(), F, sigma_F
    mean_intensity = mean_intensity_by_resolution(intensity, epsilon, dstar_sq)
    return french_wilson_kernel(
        intensity,
        sigma,
        np.ascontiguousarray(mean_intensity),
        np.ascontiguousarray(centric, dtype=np.bool_),
        ACENTRIC_TABLE,
        CENTRIC_TABLE,
    )
