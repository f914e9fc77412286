"""French-Wilson amplitudes from merged intensities, following DIALS's implementation
(dials.merge, french_wilson.implementation=dials; dials-scaling.md 12.4).

Expected intensity <I>: the merged intensities are binned in d*^3 -- n // max(n // 60, 20)
bins (at most 60, at least 20 reflections per bin), bin edges at equally spaced ranks of the
sorted d*^3 (linear interpolation between ranks), each bin half-open [lo, hi) except the last;
in each bin the standardised median median(I) / ln 2 (the mean of an exponential (acentric
Wilson) distribution whose median is the bin median, robust to outliers); <I> of a
reflection is linearly interpolated in d*^3 between bin centres (the midpoints of the bin
edges), held constant beyond the first and last centre. As in DIALS the intensities are not
divided by epsilon.

Per reflection: h = I/sigma - |sigma/<I>| (acentric) or I/sigma - |sigma/(2<I>)| (centric).
Kept only if sigma > 0, <I> != 0, I/sigma >= -3.7 and h >= -4 (else NaN). Below h = 3
(acentric) or 4 (centric) the posterior J, sigma(J), F, sigma(F) are interpolated linearly in
the tables of French & Wilson (1978) (cctbx.french_wilson, steps of 0.1 in h from -4), scaled
by sigma (J) and sqrt(sigma) (F). Above that: acentric, the normal approximation J = h sigma,
sigma(J) = sigma, F = sqrt(J), sigma(F) = sigma/(2F); centric, French & Wilson's asymptotic
expansion with the x^6 term (as DIALS and cctbx; dials-scaling.md 12.4 calls both "normal
approximation"):
    F/sqrt(sigma) = sqrt(h) (1 - 3/8 h^-2 - 87/128 h^-4 - 2889/1024 h^-6)
    sigma(F)/sqrt(sigma) = sqrt(h (1/4 h^-2 + 15/32 h^-4 + 273/128 h^-6))
    J = h sigma (1 - 1/2 h^-2 - 3/4 h^-4 - 3 h^-6), sigma(J) = 2 sigma F sigma(F) / sigma.
With fewer than `min_reflections` (200) reflections the flat positive prior is used instead
(cctbx's enforce_positive_amplitudes, which dials.merge calls): kept if sigma > 0 and
I/sigma > -4, F = sqrt((I + D)/2) with D = sqrt(I^2 + 2 sigma^2),
sigma(F) = 1/sqrt(1/F^2 + (I + 3D)/sigma^2).

Two deliberate differences from DIALS:
- a bin left empty by tied d*^3 values (equal edges) is dropped from the interpolation, where
  DIALS's binned median would be NaN and reject the reflections near it;
- reflections of equal resolution get one d*^3 before binning: values that agree to
  `TIE_RELATIVE_TOLERANCE` take the smallest of them. cctbx's d*^2 of reflections related by
  lattice (not Laue) symmetry, e.g. (h,k,l) and (k,h,l) in P321, differ in the last bits in a
  way that depends on the cell's 16th digit, and a bin edge that falls on such a tie then
  splits it by rounding noise. DIALS is left to that noise; here the bins, and so <I>, F and
  SIGF, do not move when the cell changes in its 5th to 16th digit (the cell an MTZ file
  holds, say). Where the d* of tied reflections happen to be bit-identical this is DIALS's
  binning exactly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..kernels.size_dispatch import parallel_when_large
from ..kernels.stable_argsort import stable_argsort

MIN_H = -4.0
MIN_I_OVER_SIGMA = MIN_H + 0.3
ACENTRIC_TABLE_H_MAX = 3.0
CENTRIC_TABLE_H_MAX = 4.0
MAX_BINS = 60
MIN_PER_BIN = 20
DEFAULT_MIN_REFLECTIONS = 200
# d*^3 values closer than this (relative) are one resolution: rounding noise of cctbx's d*^2
# is ~1e-16 relative, and distinct resolutions of a real cell differ by far more than 1e-9
TIE_RELATIVE_TOLERANCE = 1e-9
FLAT_PRIOR_MIN_I_OVER_SIGMA = -4.0


def _tables():
    from cctbx import french_wilson as tables  # the 1978 supplement values, used as data

    acentric = np.array([tables.ac_zj, tables.ac_zj_sd, tables.ac_zf, tables.ac_zf_sd])
    centric = np.array([tables.c_zj, tables.c_zj_sd, tables.c_zf, tables.c_zf_sd])
    return acentric, centric


ACENTRIC_TABLE, CENTRIC_TABLE = _tables()  # rows: J, sd(J), F, sd(F) in units of sigma


def standardised_median(values: np.ndarray) -> float:
    """median / ln 2: the mean of an exponential distribution with this median."""
    return float(np.median(values)) / math.log(2.0)


def expected_intensity_bins(dstar_cubed: np.ndarray):
    """Bin edges in d*^3: equally spaced ranks of the sorted values (DIALS's counting-sorted
    binning: max(n // 60, 20) points per bin)."""
    n = len(dstar_cubed)
    points_per_bin = max(n // MAX_BINS, MIN_PER_BIN)
    n_bins = max(n // points_per_bin, 1)
    return np.interp(np.linspace(0, n, n_bins + 1), np.arange(n), np.sort(dstar_cubed))


def merge_equal_resolutions(dstar_cubed: np.ndarray,
                            relative_tolerance: float = TIE_RELATIVE_TOLERANCE) -> np.ndarray:
    """d*^3 with values that agree to `relative_tolerance` (each to the previous one in
    sorted order) replaced by the smallest value of their run: reflections of one resolution
    then tie exactly, whatever the rounding of their d*."""
    order = stable_argsort(dstar_cubed)
    ordered = dstar_cubed[order]
    starts_run = np.ones(len(ordered), dtype=bool)
    starts_run[1:] = np.diff(ordered) > relative_tolerance * np.abs(ordered[1:])
    run_start = np.maximum.accumulate(np.where(starts_run, np.arange(len(ordered)), 0))
    merged = np.empty_like(dstar_cubed)
    merged[order] = ordered[run_start]
    return merged


def mean_intensity_by_resolution(intensity, dstar_sq) -> np.ndarray:
    """<I> for each reflection: binned standardised medians interpolated in d*^3."""
    intensity = np.asarray(intensity, dtype=np.float64)
    n = len(intensity)
    if n == 0:
        return np.zeros(0)
    dstar_cubed = merge_equal_resolutions(np.asarray(dstar_sq, dtype=np.float64) ** 1.5)
    edges = expected_intensity_bins(dstar_cubed)
    order = stable_argsort(dstar_cubed)
    sorted_x = dstar_cubed[order]
    # members of bin b: edges[b] <= x < edges[b+1]; the last bin also holds x == edges[-1]
    bounds = np.searchsorted(sorted_x, edges, side="left")
    bounds[-1] = n
    centres, medians = [], []
    for b in range(len(edges) - 1):  # a loop over <= 60 bins, not over reflections
        members = order[bounds[b]:bounds[b + 1]]
        if len(members):
            centres.append(0.5 * (edges[b] + edges[b + 1]))
            medians.append(standardised_median(intensity[members]))
    return np.interp(dstar_cubed, np.array(centres), np.array(medians))


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


@parallel_when_large
def french_wilson_kernel(intensity, sigma, mean_intensity, centric, acentric_table, centric_table):
    n = intensity.shape[0]
    J = np.full(n, np.nan)
    sigma_J = np.full(n, np.nan)
    F = np.full(n, np.nan)
    sigma_F = np.full(n, np.nan)
    for i in prange(n):
        s = sigma[i]
        expected = mean_intensity[i]
        if not (s > 0.0) or expected == 0.0 or not np.isfinite(expected):
            continue
        i_over_s = intensity[i] / s
        if centric[i]:
            h = i_over_s - abs(s / (2.0 * expected))
        else:
            h = i_over_s - abs(s / expected)
        if not (i_over_s >= MIN_I_OVER_SIGMA and h >= MIN_H):
            continue
        root_s = np.sqrt(s)
        if centric[i] and h < CENTRIC_TABLE_H_MAX:
            zj, zj_sd, zf, zf_sd = _interpolate_table(centric_table, h)
        elif not centric[i] and h < ACENTRIC_TABLE_H_MAX:
            zj, zj_sd, zf, zf_sd = _interpolate_table(acentric_table, h)
        elif centric[i]:
            h2 = 1.0 / (h * h)
            h4 = h2 * h2
            h6 = h2 * h4
            zf = np.sqrt(h) * (1.0 - 0.375 * h2 - (87.0 / 128.0) * h4 - (2889.0 / 1024.0) * h6)
            zf_sd = np.sqrt(h * (0.25 * h2 + (15.0 / 32.0) * h4 + (273.0 / 128.0) * h6))
            zj = h * (1.0 - 0.5 * h2 - 0.75 * h4 - 3.0 * h6)
            zj_sd = 2.0 * zf * zf_sd
        else:
            J[i] = h * s
            sigma_J[i] = s
            F[i] = np.sqrt(J[i])
            sigma_F[i] = 0.5 * s / F[i]
            continue
        J[i] = zj * s
        sigma_J[i] = zj_sd * s
        F[i] = zf * root_s
        sigma_F[i] = zf_sd * root_s
    return J, sigma_J, F, sigma_F


@parallel_when_large
def flat_prior_kernel(intensity, sigma, min_i_over_sigma):
    n = intensity.shape[0]
    F = np.full(n, np.nan)
    sigma_F = np.full(n, np.nan)
    for i in prange(n):
        s = sigma[i]
        if not (s > 0.0) or not (intensity[i] / s > min_i_over_sigma):
            continue
        I = intensity[i]
        root = np.sqrt(I * I + 2.0 * s * s)
        f = np.sqrt(0.5 * (I + root))
        F[i] = f
        sigma_F[i] = 1.0 / np.sqrt(1.0 / (f * f) + (I + 3.0 * root) / (s * s))
    return F, sigma_F


def french_wilson(intensity, sigma, centric, dstar_sq,
                  min_reflections=DEFAULT_MIN_REFLECTIONS):
    """(J, sigma_J, F, sigma_F) per reflection; NaN where French-Wilson rejects. Below
    `min_reflections` reflections: flat-prior amplitudes, J and sigma_J the input values."""
    intensity = np.ascontiguousarray(intensity, dtype=np.float64)
    sigma = np.ascontiguousarray(sigma, dtype=np.float64)
    if len(intensity) < min_reflections:
        F, sigma_F = flat_prior_kernel(intensity, sigma, FLAT_PRIOR_MIN_I_OVER_SIGMA)
        ok = np.isfinite(F)
        return (np.where(ok, intensity, np.nan), np.where(ok, sigma, np.nan), F, sigma_F)
    mean_intensity = mean_intensity_by_resolution(intensity, dstar_sq)
    return french_wilson_kernel(
        intensity,
        sigma,
        np.ascontiguousarray(mean_intensity),
        np.ascontiguousarray(centric, dtype=np.bool_),
        ACENTRIC_TABLE,
        CENTRIC_TABLE,
    )
