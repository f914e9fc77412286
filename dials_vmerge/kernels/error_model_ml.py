"""The error model's per-observation sums: the profile likelihood of b (scaling/error_model.py,
refine_maximum_likelihood) in one kernel: a few passes over the observations with no
per-observation temporaries but one, instead of a dozen numpy arrays per evaluation of b.
The first pass leaves q (and q') in the scratch that the second overwrites with the unit:
the second reads 8 B per row instead of recomputing q from I, sigma^2 and g (24 B; the
passes are memory-bound, ~4 ms per evaluation at 4e5 rows, ~25 evaluations per refinement).

Per observation q = (sigma^2 + b^2 I^2) / g^2, per group spread = sum p^2 q, unit =
max(q (1 - 2p) + spread, 1e-300), ratio = r^2 / unit; a^2 = mean(ratio) (or fixed) and
cost = sum log(a^2 unit) + sum(ratio) / a^2; cost_slope_kernel its derivative in b.
binned_deviation_sums: the per-bin sums of the DIALS b functional (error_model.b_functional).
Here, not in scaling/, so that the CUDA twins (kernels/cuda/error_model.py) are compared with
them on machines without cctbx.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def a_sq_and_cost_kernel(intensity, variance, g, share, group, residual_sq, n_groups, b,
                         fixed_a_sq, unit):
    """(a^2, cost) at b; fixed_a_sq < 0 means a^2 is the mean ratio. unit: scratch (n,)."""
    n = intensity.size
    spread = np.zeros(n_groups)
    for i in range(n):  # in row order, as np.bincount sums
        bi = b * intensity[i]
        q = (variance[i] + bi * bi) / (g[i] * g[i])
        unit[i] = q  # read back below instead of I, sigma^2, g (the same bits, less memory)
        spread[group[i]] += share[i] * share[i] * q
    sum_ratio = 0.0
    for i in range(n):
        u = unit[i] * (1.0 - 2.0 * share[i]) + spread[group[i]]
        if not u >= 1e-300:  # np.maximum: NaN stays NaN
            u = 1e-300 if u == u else u
        unit[i] = u
        sum_ratio += residual_sq[i] / u
    a_sq = fixed_a_sq
    if a_sq < 0.0:
        a_sq = sum_ratio / n if n > 0 else np.nan
    sum_log = 0.0
    for i in range(n):
        sum_log += np.log(a_sq * unit[i])
    return a_sq, sum_log + sum_ratio / a_sq


@njit(cache=True)
def cost_slope_kernel(intensity, variance, g, share, group, residual_sq, n_groups, b,
                      fixed_a_sq, unit, unit_slope):
    """d cost / d b of a_sq_and_cost_kernel's cost (a^2 profiled out or fixed: the same
    formula, sum u'/u - sum r^2 u'/u^2 / a^2). unit, unit_slope: scratch (n,).

    u' = q'(1 - 2p) + sum_group p^2 q', q' = 2 b I^2 / g^2; a clamped u has u' = 0."""
    n = intensity.size
    spread = np.zeros(n_groups)
    spread_slope = np.zeros(n_groups)
    for i in range(n):
        bi = b * intensity[i]
        g_sq = g[i] * g[i]
        q = (variance[i] + bi * bi) / g_sq
        dq = 2.0 * b * intensity[i] * intensity[i] / g_sq
        unit[i] = q  # read back below (as in a_sq_and_cost_kernel)
        unit_slope[i] = dq
        p_sq = share[i] * share[i]
        spread[group[i]] += p_sq * q
        spread_slope[group[i]] += p_sq * dq
    sum_ratio = 0.0
    for i in range(n):
        u = unit[i] * (1.0 - 2.0 * share[i]) + spread[group[i]]
        du = unit_slope[i] * (1.0 - 2.0 * share[i]) + spread_slope[group[i]]
        if not u >= 1e-300:
            u = 1e-300 if u == u else u
            du = 0.0
        unit[i] = u
        unit_slope[i] = du
        sum_ratio += residual_sq[i] / u
    a_sq = fixed_a_sq
    if a_sq < 0.0:
        a_sq = sum_ratio / n if n > 0 else np.nan
    sum_log_slope = 0.0
    sum_ratio_slope = 0.0
    for i in range(n):
        sum_log_slope += unit_slope[i] / unit[i]
        sum_ratio_slope += residual_sq[i] * unit_slope[i] / unit[i] / unit[i]
    return sum_log_slope - sum_ratio_slope / a_sq


@njit(cache=True)
def binned_deviation_sums(intensity, variance, g, ih, prefactor, bin_index, n_bins, a, b):
    """Per bin sum(delta) and sum(delta^2), delta as normalised_deviations, summed in
    observation order (as np.bincount does)."""
    s1 = np.zeros(n_bins)
    s2 = np.zeros(n_bins)
    for i in range(intensity.size):
        k = bin_index[i]
        if k < 0:
            continue
        bi = b * intensity[i]
        sigma_prime = a * np.sqrt(variance[i] + bi * bi) / g[i]
        d = prefactor[i] * (intensity[i] / g[i] - ih[i]) / sigma_prime
        s1[k] += d
        s2[k] += d * d
    return s1, s2


# -- the same sums split into local passes and sequential sums (issue 11) ---------------------
# In a rank-local MPI job each rank holds a contiguous run of the error model's groups (the
# Friedel-pair order of scaling/error_model.py friedel_pair_layout). The per-observation units
# are local (their group sums lie within a group); the sums over observations are continued
# from rank to rank (backends/rank_local.sequential_over_ranks), each kernel below adding its
# terms to the running totals it is given in row order: the additions of the one-pass kernels
# above in the same order, hence their bits (tests/test_error_model_ml_kernel.py).

@njit(cache=True)
def unit_kernel(intensity, variance, g, share, group, n_groups, b, unit):
    """unit of a_sq_and_cost_kernel at b into `unit` (clamped as there)."""
    n = intensity.size
    spread = np.zeros(n_groups)
    for i in range(n):
        bi = b * intensity[i]
        q = (variance[i] + bi * bi) / (g[i] * g[i])
        unit[i] = q
        spread[group[i]] += share[i] * share[i] * q
    for i in range(n):
        u = unit[i] * (1.0 - 2.0 * share[i]) + spread[group[i]]
        if not u >= 1e-300:
            u = 1e-300 if u == u else u
        unit[i] = u


@njit(cache=True)
def unit_and_slope_kernel(intensity, variance, g, share, group, n_groups, b, unit,
                          unit_slope):
    """unit and d unit / d b of cost_slope_kernel at b (clamped as there)."""
    n = intensity.size
    spread = np.zeros(n_groups)
    spread_slope = np.zeros(n_groups)
    for i in range(n):
        bi = b * intensity[i]
        g_sq = g[i] * g[i]
        q = (variance[i] + bi * bi) / g_sq
        dq = 2.0 * b * intensity[i] * intensity[i] / g_sq
        unit[i] = q
        unit_slope[i] = dq
        p_sq = share[i] * share[i]
        spread[group[i]] += p_sq * q
        spread_slope[group[i]] += p_sq * dq
    for i in range(n):
        u = unit[i] * (1.0 - 2.0 * share[i]) + spread[group[i]]
        du = unit_slope[i] * (1.0 - 2.0 * share[i]) + spread_slope[group[i]]
        if not u >= 1e-300:
            u = 1e-300 if u == u else u
            du = 0.0
        unit[i] = u
        unit_slope[i] = du


@njit(cache=True)
def add_ratio_sum(residual_sq, unit, totals):
    """totals[0] += r^2 / unit, term by term in row order."""
    s = totals[0]
    for i in range(unit.size):
        s += residual_sq[i] / unit[i]
    totals[0] = s


@njit(cache=True)
def add_log_sum(unit, a_sq, totals):
    """totals[0] += log(a^2 unit), term by term in row order."""
    s = totals[0]
    for i in range(unit.size):
        s += np.log(a_sq * unit[i])
    totals[0] = s


@njit(cache=True)
def add_slope_sums(residual_sq, unit, unit_slope, totals):
    """totals[0] += unit'/unit and totals[1] += r^2 unit'/unit^2, in row order."""
    s_log = totals[0]
    s_ratio = totals[1]
    for i in range(unit.size):
        s_log += unit_slope[i] / unit[i]
        s_ratio += residual_sq[i] * unit_slope[i] / unit[i] / unit[i]
    totals[0] = s_log
    totals[1] = s_ratio


@njit(cache=True)
def index_bounds(merged, rows, lo, hi):
    """lo, hi (3,) int64 lowered / raised to cover the indices merged[rows]."""
    for j in range(rows.size):
        i = rows[j]
        for k in range(3):
            v = np.int64(merged[i, k])
            if v < lo[k]:
                lo[k] = v
            if v > hi[k]:
                hi[k] = v


@njit(cache=True)
def friedel_pair_keys(anomalous, merged, rows, lo, span1, span2, out, start):
    """out[start + j] = 2 key(merged[rows[j]]) + hand, key the (h, k, l)-ordered packing of
    the non-anomalous index from origin lo, hand 1 where the anomalous index differs."""
    for j in range(rows.size):
        i = rows[j]
        key = ((np.int64(merged[i, 0]) - lo[0]) * span1
               + (np.int64(merged[i, 1]) - lo[1])) * span2 + (np.int64(merged[i, 2]) - lo[2])
        hand = 0
        for k in range(3):
            if anomalous[i, k] != merged[i, k]:
                hand = 1
        out[start + j] = 2 * key + hand


@njit(cache=True)
def ratio_terms(residual_sq, unit, out):
    """out[i] = r^2 / unit (the terms add_ratio_sum adds), computed locally."""
    for i in range(unit.size):
        out[i] = residual_sq[i] / unit[i]


@njit(cache=True)
def log_terms(unit, a_sq, out):
    """out[i] = log(a^2 unit) (the terms add_log_sum adds), computed locally."""
    for i in range(unit.size):
        out[i] = np.log(a_sq * unit[i])


@njit(cache=True)
def add_sum(terms, totals):
    """totals[0] += the terms, one by one in row order: with the terms computed first on
    every rank at once, only these additions run one rank after another."""
    s = totals[0]
    for i in range(terms.size):
        s += terms[i]
    totals[0] = s
