"""Sigma calibration of scaled observations: are the sigmas right? (issue 14)

Each observation x_i = I_i/g_i with sigma_i is compared with the inverse-variance mean of the
OTHER observations of its reflection (Friedel mates apart):

    delta_i = (x_i - m_{-i}) / sqrt(sigma_i^2 + 1/W_{-i}),   W_{-i} = sum_{j != i} 1/sigma_j^2.

With correct sigmas and no systematic error delta_i is exactly unit normal whatever the
multiplicity and weights (no (n-1)/n prefactor), so its SD is the calibration: > 1 means the
sigmas are too small (merged sigmas are then too small by about that factor), < 1 too large.
Reported overall, by intensity (equal-count bins of m_{-i}) and by resolution (equal-count bins
of d*^2), with a robust SD (1.4826 x median |delta|, insensitive to outliers) and the points of
a normal probability plot (expected normal quantile, observed delta) for plotting.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from scipy.special import ndtri

from ..kernels.stable_argsort import stable_argsort

N_BINS = 10
N_PLOT_POINTS = 51
MAD_TO_SD = 1.482602218505602  # 1 / ndtri(0.75)


def leave_one_out_deviations(intensity, sigma, group_start, order=None):
    """(delta, m_{-i}, group of each observation) over observations sorted by group (groups of
    one observation give no deviation: they are left out of all three arrays).

    order: the observations of each group, when intensity and sigma are not in group order
    (observation order[k] is the k-th of the sorted table); None means they are."""
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if order is None:
        order = np.arange(intensity.size, dtype=np.int64)
    return _leave_one_out_kernel(intensity, sigma, np.asarray(order, dtype=np.int64),
                                 np.asarray(group_start, dtype=np.int64))


@njit(cache=True)
def _leave_one_out_kernel(intensity, sigma, order, group_start):
    # A kernel, not numpy: the ~10 temporaries of every observation (weights, group totals
    # broadcast back, masks) were the peak RSS of merging a 1e6 sweep. Group sums run over
    # the group's observations in order, as np.bincount adds them, so the values are the same.
    n_groups = group_start.size - 1
    n_kept = 0
    for pass_number in range(2):
        if pass_number == 1:
            delta = np.empty(n_kept)
            others_mean = np.empty(n_kept)
            group_of = np.empty(n_kept, dtype=np.int64)
            n_kept = 0
        for g in range(n_groups):
            total_w = 0.0
            total_wx = 0.0
            for k in range(group_start[g], group_start[g + 1]):
                s = sigma[order[k]]
                w = 1.0 / (s * s)
                total_w += w
                total_wx += w * intensity[order[k]]
            for k in range(group_start[g], group_start[g + 1]):
                s = sigma[order[k]]
                w = 1.0 / (s * s)
                others_w = total_w - w
                # relative test: cancellation leaves ~1e-16 W where the group has one observation
                if not others_w > 1e-9 * total_w:
                    continue
                if pass_number == 1:
                    x = intensity[order[k]]
                    mean = (total_wx - w * x) / others_w
                    others_mean[n_kept] = mean
                    delta[n_kept] = (x - mean) / math.sqrt(s * s + 1.0 / others_w)
                    group_of[n_kept] = g
                n_kept += 1
    return delta, others_mean, group_of


def _sd_summary(delta):
    if delta.size < 2:
        return {"n": int(delta.size), "sd": float("nan"), "robust_sd": float("nan")}
    return {"n": int(delta.size), "sd": float(np.std(delta)),
            "robust_sd": float(MAD_TO_SD * np.median(np.abs(delta)))}


def _equal_count_bins(values, delta, n_bins, name, order=None):
    """order: np.argsort(values, kind="stable") when the caller has it."""
    if order is None:
        order = stable_argsort(values)
    out = []
    for chunk in np.array_split(order, n_bins):
        if chunk.size == 0:
            continue
        entry = {f"{name}_min": float(values[chunk[0]]), f"{name}_max": float(values[chunk[-1]])}
        entry.update(_sd_summary(delta[chunk]))
        out.append(entry)
    return out


def stable_order_of_group_values(group_values, group):
    """np.argsort(group_values[group], kind="stable") for `group` ascending (observations
    in group order), from a sort of the groups alone: sorting by (value, observation) is
    sorting the groups by (value, group) and listing each group's observations in turn, as
    a group's observations are contiguous and follow those of every lower group."""
    group = np.asarray(group, dtype=np.int64)
    counts = np.bincount(group, minlength=len(group_values))
    return order_of_group_runs(stable_argsort(group_values), counts)


def order_of_group_runs(group_order, counts):
    """The observations of the groups `group_order`, in that order, as positions into
    observations stored group after group (group g's `counts[g]` observations contiguous,
    groups ascending); groups without observations are skipped."""
    counts = np.asarray(counts, dtype=np.int64)
    first = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    group_order = np.asarray(group_order, dtype=np.int64)
    group_order = group_order[counts[group_order] > 0]
    lengths = counts[group_order]
    # position k of the output: observation first[g] + (k - start of g's run in the output)
    run_start = np.zeros(len(group_order), dtype=np.int64)
    np.cumsum(lengths[:-1], out=run_start[1:])
    order = np.arange(int(lengths.sum()), dtype=np.int64)
    order += np.repeat(first[group_order] - run_start, lengths)
    return order


def probability_plot_points(delta, n_points=N_PLOT_POINTS):
    """(expected normal quantile, observed delta) at n_points evenly spaced ranks."""
    if delta.size == 0:
        return []
    n = delta.size
    ranks = np.unique(np.linspace(0, n - 1, n_points).round().astype(np.int64))
    # the values at these ranks of the sorted deltas: a partition places exactly them
    ordered = np.partition(delta, ranks)
    expected = ndtri((ranks + 0.5) / n)
    return [[float(e), float(o)] for e, o in zip(expected, ordered[ranks])]


def sigma_calibration(intensity, sigma, grouped, n_bins=N_BINS):
    """The calibration dict of observations (I/g, sigma/g, original order) grouped by
    `grouped` (a merging.groups.GroupedObservations, usually Friedel mates apart)."""
    delta, others_mean, group = grouped_deviations(intensity, sigma, grouped)
    return calibration_summary(delta, others_mean, group, grouped.dstar_sq, n_bins)


def grouped_deviations(intensity, sigma, grouped):
    """leave_one_out_deviations of the observations with sigma > 0 of `grouped`'s groups."""
    perm = grouped.permutation
    ok = sigma[perm] > 0
    perm = perm[ok]
    group_start = np.concatenate([[0], np.cumsum(np.bincount(
        np.repeat(np.arange(grouped.n_groups), np.diff(grouped.group_start))[ok],
        minlength=grouped.n_groups))]).astype(np.int64)
    return leave_one_out_deviations(intensity, sigma, group_start, order=perm)


def calibration_summary(delta, others_mean, group, group_dstar_sq, n_bins=N_BINS):
    """The calibration dict from the deviations (leave_one_out_deviations: group order, the
    group of each) and the groups' d*^2."""
    out = {"definition": "delta = (I/g - mean of the other observations) / sqrt(sigma^2 + "
                         "sigma(mean of the others)^2); SD 1 when sigmas are right"}
    out.update(_sd_summary(delta))
    if delta.size >= n_bins:
        out["by_intensity"] = _equal_count_bins(others_mean, delta, n_bins, "intensity")
        dstar_sq = group_dstar_sq[group]
        if np.all(np.isfinite(dstar_sq)):
            out["by_resolution"] = _equal_count_bins(
                dstar_sq, delta, n_bins, "dstar_sq",
                order=stable_order_of_group_values(group_dstar_sq, group))
    out["normal_probability_plot"] = probability_plot_points(delta)
    return out


def format_calibration(calibration) -> str:
    """Log lines: overall, by intensity and by resolution."""
    lines = ["Sigma calibration (SD of normalised deviations from the other observations; "
             "1 = correct sigmas, > 1 = sigmas too small):",
             f"  overall: SD {calibration['sd']:.3f}, robust SD {calibration['robust_sd']:.3f} "
             f"({calibration['n']} observations)"]
    for key, label, name, fmt in (("by_intensity", "Intensity", "intensity", "{:>10.4g}"),
                                  ("by_resolution", "d (A)", "dstar_sq", "{:>10.3f}")):
        if key not in calibration:
            continue
        lines.append(f"  {label + ' from':>14} {'to':>10} {'SD':>7} {'robust':>7} {'n':>8}")
        for b in calibration[key]:
            lo, hi = b[f"{name}_min"], b[f"{name}_max"]
            if name == "dstar_sq":  # shown as d, low resolution first
                lo, hi = (1.0 / np.sqrt(lo) if lo > 0 else float("inf")), 1.0 / np.sqrt(hi)
            lines.append(f"  {fmt.format(lo):>14} {fmt.format(hi)} {b['sd']:>7.3f} "
                         f"{b['robust_sd']:>7.3f} {b['n']:>8d}")
    return "\n".join(lines)
