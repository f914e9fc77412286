"""ΔCC½ of every dataset or image group in one pass over the observations (numpy and numba
only).

The CC½ is DIALS's sigma-tau form (Assmann, Brehm and Diederichs 2016, as
dials.algorithms.statistics.delta_cchalf): for each unique reflection h with n_h > 1
observations x (scaled I/g), mean_h = Σx/n and var_h = (Σx² − (Σx)²/n) / (n − 1) / n; in each
resolution bin with more than one such reflection, σ_y = sample variance of the means,
σ_e = mean of var_h and CC½ = (σ_y − σ_e) / (σ_y + σ_e); the overall value is the mean of the
bins' CC½ weighted by their number of reflections.

Leaving a group g out changes only the unique reflections g observed. So the per-bin sums
(Σ mean, Σ mean², Σ var, count) of the whole data are formed once, and for each group the
kernel walks that group's (h, Σx, Σx², n) pairs of the observations sorted by (group, h),
takes each h's full contribution out of its bin and puts back the contribution without the
group. The work is one pass over the observations plus n_bins per group, not one merge per
group.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _contribution(sum_x, sum_x2, n):
    """(mean, variance of the mean) of a reflection from its sums; n > 1."""
    mean = sum_x / n
    var = (sum_x2 - sum_x * sum_x / n) / (n - 1) / n
    return mean, var


@njit(cache=True)
def _mean_cc_half(s1, s2, sv, count):
    """Reflection-weighted mean over the bins with > 1 reflection of the sigma-tau CC½."""
    total = 0.0
    weight = 0.0
    for b in range(count.shape[0]):
        n = count[b]
        if n > 1:
            sigma_y = (s2[b] - s1[b] * s1[b] / n) / (n - 1)
            sigma_e = sv[b] / n
            if sigma_y + sigma_e != 0.0:  # else every mean equal and exact: no information
                total += n * (sigma_y - sigma_e) / (sigma_y + sigma_e)
                weight += n
    if weight > 0:
        return total / weight
    return 0.0


@njit(cache=True)
def bin_sums_kernel(sum_x, sum_x2, n_obs, bin_of_unique, n_bins):
    """Per-bin Σ mean, Σ mean², Σ var and count over the unique reflections with n > 1."""
    s1 = np.zeros(n_bins)
    s2 = np.zeros(n_bins)
    sv = np.zeros(n_bins)
    count = np.zeros(n_bins)
    for h in range(sum_x.shape[0]):
        if n_obs[h] > 1:
            mean, var = _contribution(sum_x[h], sum_x2[h], n_obs[h])
            b = bin_of_unique[h]
            s1[b] += mean
            s2[b] += mean * mean
            sv[b] += var
            count[b] += 1.0
    return s1, s2, sv, count


@njit(cache=True, parallel=True)
def leave_one_out_kernel(x_sorted, unique_sorted, group_start, sum_x, sum_x2, n_obs,
                         bin_of_unique, s1, s2, sv, count):
    """CC½ without each group. x_sorted, unique_sorted: the observations sorted by (group,
    unique reflection); group g owns positions group_start[g]:group_start[g + 1]."""
    n_groups = group_start.shape[0] - 1
    n_bins = s1.shape[0]
    cc = np.empty(n_groups)
    for g in prange(n_groups):
        b1 = s1.copy()
        b2 = s2.copy()
        bv = sv.copy()
        bc = count.copy()
        i = group_start[g]
        end = group_start[g + 1]
        while i < end:
            h = unique_sorted[i]
            gx = 0.0
            gx2 = 0.0
            gn = 0
            while i < end and unique_sorted[i] == h:
                gx += x_sorted[i]
                gx2 += x_sorted[i] * x_sorted[i]
                gn += 1
                i += 1
            b = bin_of_unique[h]
            n = n_obs[h]
            if n > 1:
                mean, var = _contribution(sum_x[h], sum_x2[h], n)
                b1[b] -= mean
                b2[b] -= mean * mean
                bv[b] -= var
                bc[b] -= 1.0
            n_left = n - gn
            if n_left > 1:
                mean, var = _contribution(sum_x[h] - gx, sum_x2[h] - gx2, n_left)
                b1[b] += mean
                b2[b] += mean * mean
                bv[b] += var
                bc[b] += 1.0
        cc[g] = _mean_cc_half(b1, b2, bv, bc)
    return cc


def cc_half_without_each_group(x, unique, group, bin_of_unique, n_groups, n_bins):
    """(CC½ of all observations, CC½ without group g for each g).

    x: scaled intensities; unique: unique-reflection index of each observation (0..U-1);
    group: the group each observation belongs to (0..n_groups-1); bin_of_unique: resolution
    bin of each unique reflection (0..n_bins-1)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    unique = np.ascontiguousarray(unique, dtype=np.int64)
    group = np.ascontiguousarray(group, dtype=np.int64)
    bin_of_unique = np.ascontiguousarray(bin_of_unique, dtype=np.int64)
    n_unique = bin_of_unique.shape[0]
    sum_x = np.bincount(unique, weights=x, minlength=n_unique)
    sum_x2 = np.bincount(unique, weights=x * x, minlength=n_unique)
    n_obs = np.bincount(unique, minlength=n_unique).astype(np.int64)
    s1, s2, sv, count = bin_sums_kernel(sum_x, sum_x2, n_obs, bin_of_unique, n_bins)
    cc_all = _mean_cc_half(s1, s2, sv, count)
    # one sort on a combined key (group major): much faster than lexsort on two keys
    order = np.argsort(group * np.int64(max(n_unique, 1)) + unique, kind="stable")
    group_start = np.searchsorted(group[order], np.arange(n_groups + 1)).astype(np.int64)
    cc_without = leave_one_out_kernel(x[order], unique[order], group_start, sum_x, sum_x2,
                                      n_obs, bin_of_unique, s1, s2, sv, count)
    return float(cc_all), cc_without
