"""Outlier rejection on an IhTable (dials-scaling.md 7).

Weights are first capped per group at 10x the group's median weight. Then:
* standard: iterative leave-one-out normalised deviations, only in groups with n > 2;
      Ih(-l) = sum_{k!=l} w g I / sum_{k!=l} w g^2,
      z = |I - g Ih(-l)| / sqrt(1/w + g^2 / sum_{k!=l} w g^2)   (1000 if that sum is 0);
  per group only the largest z is rejected, if > zmax, and the group is re-examined
  without it until nothing more is rejected. Groups are independent, so iterating within
  each group gives the same set as DIALS's global rounds.
* simple: one pass, the tested reflection included in the mean,
      z = |I - g Ih| / sqrt(1/w + (g / sum w g^2)^2), every z > zmax rejected.
* E^2: I/g normalised by the resolution-shell mean of (I/g)/epsilon (section 8.3);
  E^2 > emax^2 rejected. Computed only above 10 000 reflections, as in DIALS.
* targeted: z = |I - g Ih_target| / sqrt(sigma^2 + g^2 sigma_target^2).
Each call returns a fresh boolean mask over the table's observations (sets are replaced).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.size_dispatch import parallel_when_large

from .ih_table import chunk_bounds, group_weighted_sums

WEIGHT_CAP_FACTOR = 10.0
ZERO_DENOMINATOR_Z = 1000.0
MIN_REFLECTIONS_FOR_NORMALISATION = 10000
INSERTION_SORT_MAX = 32  # larger groups are sorted in O(n log n) for their median


@njit(cache=True)
def _heap_sort_prefix(values, n):
    """Sort values[:n] in place, ascending. A heap sort rather than ndarray.sort(): numba's
    generic quicksort costs ~1.8 s of compilation on every first run (issue 15's cold start),
    and the sorted values, hence the median, are the same whichever sort produces them."""
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(values, start, n)
    top = np.int64(0)  # int64, not Literal[int](0): a literal argument compiles the helper twice
    for end in range(n - 1, 0, -1):
        values[0], values[end] = values[end], values[0]
        _sift_down(values, top, end)


@njit(cache=True)
def _sift_down(values, root, end):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and values[child + 1] > values[child]:
            child += 1
        if values[root] >= values[child]:
            return
        values[root], values[child] = values[child], values[root]
        root = child


@parallel_when_large
def capped_weights_kernel(weight, group_start, chunk_start, out):
    """min(w, 10 median(w of the group)); the median sorts a per-thread buffer in place
    (np.median would allocate a copy for every group)."""
    n_chunks = chunk_start.size - 1
    max_size = 1
    for grp in range(group_start.size - 1):
        max_size = max(max_size, group_start[grp + 1] - group_start[grp])
    for c in prange(n_chunks):
        buf = np.empty(max_size)
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            n = hi - lo
            if n == 0:
                continue
            if n <= INSERTION_SORT_MAX:
                for j in range(n):  # insertion sort: most groups hold a few observations
                    v = weight[lo + j]
                    k = j
                    while k > 0 and buf[k - 1] > v:
                        buf[k] = buf[k - 1]
                        k -= 1
                    buf[k] = v
            else:
                # thousands of stills give groups of ~1000 observations, where the
                # quadratic insertion sort took 4.5 s a call (20 000 stills)
                for j in range(n):
                    buf[j] = weight[lo + j]
                _heap_sort_prefix(buf, n)
            if n % 2 == 1:
                median = buf[n // 2]
            else:
                median = (buf[n // 2 - 1] + buf[n // 2]) / 2.0
            cap = WEIGHT_CAP_FACTOR * median
            for i in range(lo, hi):
                out[i] = min(weight[i], cap)


@parallel_when_large
def standard_outlier_kernel(intensity, weight, g, group_start, chunk_start, zmax, outlier):
    n_chunks = chunk_start.size - 1
    for c in prange(n_chunks):
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            while True:
                n_active = 0
                s_wgi = 0.0
                s_wgg = 0.0
                for i in range(lo, hi):
                    if not outlier[i]:
                        n_active += 1
                        wg = weight[i] * g[i]
                        s_wgi += wg * intensity[i]
                        s_wgg += wg * g[i]
                if n_active <= 2:
                    break
                z_max_found = -1.0
                worst = -1
                for i in range(lo, hi):
                    if outlier[i]:
                        continue
                    wg = weight[i] * g[i]
                    others_wgg = s_wgg - wg * g[i]
                    if others_wgg == 0.0:
                        z = ZERO_DENOMINATOR_Z
                    else:
                        ih_others = (s_wgi - wg * intensity[i]) / others_wgg
                        z = abs(intensity[i] - g[i] * ih_others) / np.sqrt(
                            1.0 / weight[i] + g[i] * g[i] / others_wgg)
                    if z > z_max_found:
                        z_max_found = z
                        worst = i
                if z_max_found > zmax:
                    outlier[worst] = True
                else:
                    break


@parallel_when_large
def simple_outlier_kernel(intensity, weight, g, group_start, chunk_start, zmax, outlier):
    n_chunks = chunk_start.size - 1
    for c in prange(n_chunks):
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
            if s_wgg <= 0.0:
                continue
            ih = s_wgi / s_wgg
            for i in range(lo, hi):
                # DIALS squares g / sum(w g^2) here, not g^2 / sum(w g^2)
                term = g[i] / s_wgg
                z = abs(intensity[i] - g[i] * ih) / np.sqrt(1.0 / weight[i] + term * term)
                if z > zmax:
                    outlier[i] = True


def capped_weights(table, nproc=1):
    out = np.empty(table.n_obs)
    capped_weights_kernel(table.weight, table.group_start, chunk_bounds(table.group_start, nproc),
                          out)
    return out


def _outlier_mask(kernel, table, zmax, nproc):
    """Run one of the z-test kernels on the table with capped weights; a fresh mask."""
    outlier = np.zeros(table.n_obs, dtype=np.bool_)
    kernel(table.intensity, capped_weights(table, nproc), table.g, table.group_start,
           chunk_bounds(table.group_start, nproc), float(zmax), outlier)
    return outlier


def standard_outliers(table, zmax=6.0, nproc=1):
    return _outlier_mask(standard_outlier_kernel, table, zmax, nproc)


def simple_outliers(table, zmax=6.0, nproc=1):
    return _outlier_mask(simple_outlier_kernel, table, zmax, nproc)


def targeted_outliers(intensity, variance, g, target_ih, target_variance, zmax=6.0):
    """Rejection against a fixed target intensity per observation (TargetScaler)."""
    z = np.abs(intensity - g * target_ih) / np.sqrt(variance + g * g * target_variance)
    return z > zmax


def e_squared(table, space_group, unit_cell):
    """E^2 = (I/g) / N(d) per observation, or None below the size DIALS normalises at."""
    from ..backends import rank_local
    from .normalisation import grouped_quasi_normalised_e_squared

    # every rank's observations in a rank-local job (issue 11): all ranks decide alike
    if rank_local.total(table.n_obs) <= MIN_REFLECTIONS_FOR_NORMALISATION:
        return None
    # np.where(g != 0, I / g, 0) without the division's temporary beside its result
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = table.intensity / table.g
    scaled[table.g == 0] = 0.0
    return grouped_quasi_normalised_e_squared(table.asu_index, table.group_start, scaled,
                                              space_group, unit_cell)


def esq_outliers(table, space_group, unit_cell, emax=10.0):
    esq = e_squared(table, space_group, unit_cell)
    if esq is None or emax is None:
        return np.zeros(table.n_obs, dtype=bool)
    return esq > emax * emax


def reject_outliers(table, method="standard", zmax=6.0, emax=10.0, space_group=None,
                    unit_cell=None, nproc=1, device="cpu", device_columns=None):
    """The outlier mask of one rejection round: method, then the E^2 test if emax is set.
    device="cuda": the z-test on the device (kernels.cuda.outliers, the same mask);
    device_columns: the table's (I, w, g, group_start) already on the device (the job's
    resident table, backends.cuda_job_table), so nothing goes up."""
    if device == "cuda" and device_columns is not None and method in ("simple", "standard",
                                                                      None):
        from ..kernels.cuda.outliers import resident_outlier_mask

        outlier = resident_outlier_mask(*device_columns, method or "standard", zmax)
    elif device == "cuda" and method in ("simple", "standard", None):
        from ..kernels.cuda.outliers import outlier_mask

        outlier = outlier_mask(table.intensity, table.weight, table.g, table.group_start,
                               method or "standard", zmax)
    elif method == "simple":
        outlier = simple_outliers(table, zmax, nproc)
    elif method in ("standard", None):
        outlier = standard_outliers(table, zmax, nproc)
    else:
        raise ValueError(f"unknown outlier rejection method {method!r}")
    if emax and space_group is not None and unit_cell is not None:
        outlier |= esq_outliers(table, space_group, unit_cell, emax)
    return outlier
