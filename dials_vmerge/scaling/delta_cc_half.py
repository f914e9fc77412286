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

Both sums (the bins', then each group's corrections) run over the unique reflections in
order, so under MPI, where each rank holds a contiguous run of them (issue 11), a pass
continued from rank to rank (the `sequential` argument) gives the one-process bits.
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
def bin_sums_kernel(sum_x, sum_x2, n_obs, bin_of_unique, sums):
    """Adds to sums (4, n_bins) the per-bin Σ mean, Σ mean², Σ var and count of the unique
    reflections with n > 1, one after the other in their order."""
    for h in range(sum_x.shape[0]):
        if n_obs[h] > 1:
            mean, var = _contribution(sum_x[h], sum_x2[h], n_obs[h])
            b = bin_of_unique[h]
            sums[0, b] += mean
            sums[1, b] += mean * mean
            sums[2, b] += var
            sums[3, b] += 1.0


@njit(cache=True, parallel=True)
def leave_one_out_kernel(x_sorted, unique_sorted, group_start, sum_x, sum_x2, n_obs,
                         bin_of_unique, state):
    """Takes each group's observations out of its bin sums. x_sorted, unique_sorted: the
    observations sorted by (group, unique reflection); group g owns positions
    group_start[g]:group_start[g + 1]; state (n_groups, 4, n_bins): group g's bin sums
    (those of all observations, less the groups' reflections already passed), updated in
    place reflection by reflection in their order."""
    n_groups = group_start.shape[0] - 1
    for g in prange(n_groups):
        b1 = state[g, 0]
        b2 = state[g, 1]
        bv = state[g, 2]
        bc = state[g, 3]
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


@njit(cache=True)
def cc_of_states(state):
    n_groups = state.shape[0]
    cc = np.empty(n_groups)
    for g in range(n_groups):
        cc[g] = _mean_cc_half(state[g, 0], state[g, 1], state[g, 2], state[g, 3])
    return cc


def _in_place(values, add):
    add(values)
    return values


def cc_half_without_each_group(x, unique, group, bin_of_unique, n_groups, n_bins,
                               sequential=_in_place):
    """(CC½ of all observations, CC½ without group g for each g).

    x: scaled intensities; unique: unique-reflection index of each observation (0..U-1,
    in the reflections' order); group: the group each observation belongs to
    (0..n_groups-1); bin_of_unique: resolution bin of each unique reflection (0..n_bins-1).

    sequential(values, add): add(values) in place on a float64 array, returning the values;
    both sums (the bins', then each group's leave-one-out corrections) are one pass over
    the unique reflections in order. Under MPI each rank passes its own reflections (a
    contiguous run of the one-process order: filtering.py gives
    rank_local.sequential_over_ranks, which continues each pass from rank to rank), so
    every rank gets the bits of one process."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    unique = np.ascontiguousarray(unique, dtype=np.int64)
    group = np.ascontiguousarray(group, dtype=np.int64)
    bin_of_unique = np.ascontiguousarray(bin_of_unique, dtype=np.int64)
    n_unique = bin_of_unique.shape[0]
    sum_x = np.bincount(unique, weights=x, minlength=n_unique)
    sum_x2 = np.bincount(unique, weights=x * x, minlength=n_unique)
    n_obs = np.bincount(unique, minlength=n_unique).astype(np.int64)
    sums = sequential(np.zeros((4, n_bins)), lambda s: bin_sums_kernel(
        sum_x, sum_x2, n_obs, bin_of_unique, s)).reshape(4, n_bins)
    cc_all = _mean_cc_half(sums[0], sums[1], sums[2], sums[3])
    # one sort on a combined key (group major): much faster than lexsort on two keys
    order = np.argsort(group * np.int64(max(n_unique, 1)) + unique, kind="stable")
    group_start = np.searchsorted(group[order], np.arange(n_groups + 1)).astype(np.int64)
    x_sorted, unique_sorted = x[order], unique[order]
    del order
    state = np.empty((n_groups, 4, n_bins))
    state[:] = sums
    state = sequential(state, lambda s: leave_one_out_kernel(
        x_sorted, unique_sorted, group_start, sum_x, sum_x2, n_obs, bin_of_unique,
        s.reshape(n_groups, 4, n_bins))).reshape(n_groups, 4, n_bins)
    return float(cc_all), cc_of_states(state)
