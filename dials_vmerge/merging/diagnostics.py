"""Diagnostics of a merge for the report and the JSON (fixed-size summaries: histograms,
quantiles, per-shell and per-image counts; never per-observation arrays, so the JSON and the
HTML report stay small whatever the number of observations).

- normalised deviations (dials' error-model diagnostics): for each observation of a unique
  reflection with n > 1, delta = sqrt((n - 1) / n) (I - <I>) / sigma, <I> the
  inverse-variance mean of the reflection, I and sigma the scaled I/g and sigma/g (after the
  error model); histogram over [-DELTA_RANGE, DELTA_RANGE] and the normal probability plot
  (sorted delta against the standard normal quantiles Phi^-1((k - 1/2) / n), at most
  QUANTILE_POINTS evenly spaced order statistics);
- I/sigma against log10 I of the merged reflections (I > 0), mean per bin;
- the histogram of the applied inverse scale factors g;
- second moments <I^2>/<I>^2 of the merged acentric intensities per resolution shell
  (2 for untwinned data; 1.5 for a perfect merohedral twin);
- outliers rejected in scaling: detector positions (every k-th, at most MAX_OUTLIER_POINTS)
  and counts per batch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


def rounded(values, digits: int = 6) -> list:
    """Values as a list of floats with `digits` significant digits (plot data: the JSON and
    the report stay small)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).tolist()]

DELTA_RANGE = 6.0
DELTA_BINS = 120
QUANTILE_POINTS = 1000
LOG_I_BINS = 40
SCALE_BINS = 60
MAX_OUTLIER_POINTS = 5000


@njit(cache=True)
def normalised_deviations_kernel(permutation, group_start, intensity, sigma):
    """delta of every observation of a group with n > 1 (module docstring), group order."""
    n_groups = group_start.shape[0] - 1
    count = 0
    for g in range(n_groups):
        if group_start[g + 1] - group_start[g] > 1:
            count += group_start[g + 1] - group_start[g]
    out = np.empty(count)
    k = 0
    for g in range(n_groups):
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            continue
        sum_w = 0.0
        sum_wi = 0.0
        for j in range(start, start + n):
            row = permutation[j]
            w = 1.0 / (sigma[row] * sigma[row])
            sum_w += w
            sum_wi += w * intensity[row]
        mean = sum_wi / sum_w
        factor = math.sqrt((n - 1.0) / n)
        for j in range(start, start + n):
            row = permutation[j]
            out[k] = factor * (intensity[row] - mean) / sigma[row]
            k += 1
    return out


def _histogram(values, lo, hi, n_bins):
    edges = np.linspace(lo, hi, n_bins + 1)
    # a bin count and range, not the edges: numpy then bins by arithmetic, corrected
    # against these same edges (the same counts), instead of sorting the values in blocks
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        counts, _ = np.histogram(values, bins=n_bins, range=(lo, hi))
    else:  # numpy widens an empty range and refuses an infinite one: the edges as given
        counts, _ = np.histogram(values, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(np.int64).tolist(),
            "below": int((values < lo).sum()), "above": int((values > hi).sum())}


def normal_quantiles(n: int, k: np.ndarray) -> np.ndarray:
    """Phi^-1((k + 1/2) / n) for 0-based order statistics k."""
    from scipy.special import ndtri

    return ndtri((np.asarray(k, dtype=np.float64) + 0.5) / n)


def normalised_deviations(groups, intensity, sigma) -> np.ndarray:
    return normalised_deviations_kernel(groups.permutation, groups.group_start,
                                        np.asarray(intensity, np.float64),
                                        np.asarray(sigma, np.float64))


def normalised_deviation_summary(groups, intensity, sigma) -> dict:
    return deviation_summary(normalised_deviations(groups, intensity, sigma))


def deviation_summary(delta) -> dict:
    """The summary of normalised deviations in group order (sorted here, in place)."""
    if len(delta) == 0:
        return {"n": 0}
    delta.sort()
    k = np.unique(np.round(np.linspace(0, len(delta) - 1, min(QUANTILE_POINTS, len(delta))))
                  .astype(np.int64))
    return {
        "n": int(len(delta)), "mean": float(delta.mean()), "sd": float(delta.std()),
        "histogram": _histogram(delta, -DELTA_RANGE, DELTA_RANGE, DELTA_BINS),
        "probability_plot": {"expected": rounded(normal_quantiles(len(delta), k)),
                             "observed": rounded(delta[k])},
    }


def i_over_sigma_vs_log_i(merged) -> dict:
    positive = (merged.intensity > 0) & (merged.sigma > 0)
    if not positive.any():
        return {"log10_i": [], "mean_i_over_sigma": [], "n": []}
    log_i = np.log10(merged.intensity[positive])
    ratio = merged.intensity[positive] / merged.sigma[positive]
    edges = np.linspace(log_i.min(), log_i.max() + 1e-9, LOG_I_BINS + 1)
    which = np.clip(np.searchsorted(edges, log_i, side="right") - 1, 0, LOG_I_BINS - 1)
    n = np.bincount(which, minlength=LOG_I_BINS)
    total = np.bincount(which, weights=ratio, minlength=LOG_I_BINS)
    used = n > 0
    centres = 0.5 * (edges[:-1] + edges[1:])
    return {"log10_i": centres[used].tolist(),
            "mean_i_over_sigma": (total[used] / n[used]).tolist(),
            "n": n[used].astype(np.int64).tolist()}


def second_moments(merged, shells) -> dict:
    """<I^2>/<I>^2 of the acentric merged intensities in each statistics shell."""
    d = 1.0 / np.sqrt(merged.dstar_sq)
    acentric = ~merged.centric
    values = []
    for shell in shells:
        inside = acentric & (d <= shell["d_max"]) & (d >= shell["d_min"])
        i = merged.intensity[inside]
        mean = i.mean() if len(i) else 0.0
        values.append(float((i * i).mean() / mean ** 2) if len(i) > 1 and mean != 0 else None)
    return {"d_min": [s["d_min"] for s in shells], "second_moment": values}


def outlier_summary(table, experiments) -> dict:
    """Outliers of scaling (flag outlier_in_scaling) in a scaled table."""
    from .. import flags
    from .api import _batches

    if "flags" not in table or "xyzobs.px.value" not in table:
        return {"n": 0}
    rows = np.flatnonzero((table.peek("flags") & np.uint64(flags.outlier_in_scaling)) != 0)
    out = {"n": int(len(rows))}
    if len(rows) == 0:
        return out
    step = max(1, math.ceil(len(rows) / MAX_OUTLIER_POINTS))
    shown = rows[::step]
    xyz = table.peek("xyzobs.px.value", shown)
    out["every"] = step
    out["x_px"] = np.round(xyz[:, 0], 1).tolist()
    out["y_px"] = np.round(xyz[:, 1], 1).tolist()
    batches, counts = np.unique(_batches(table, rows, experiments), return_counts=True)
    out["batch"] = batches.astype(np.int64).tolist()
    out["count"] = counts.astype(np.int64).tolist()
    return out


def merge_diagnostics(result, groupings, table, experiments) -> dict:
    obs = result.observations
    halves = None
    if not result.space_group.is_centric():
        groups = groupings.get(True)
        halves = alternate_half_means_kernel(groups.permutation, groups.group_start,
                                             obs.intensity, obs.sigma)
    return diagnostics_of(
        result, normalised_deviation_summary(groupings.get(False), obs.intensity, obs.sigma),
        scale_histogram(obs.scale), groupings.get(True), halves, table, experiments)


def scale_histogram(scale, value_range=None) -> dict:
    """The histogram of the inverse scale factors over value_range (default: theirs)."""
    scale = np.asarray(scale)
    return _histogram(scale, *(value_range or _scale_range(scale)), SCALE_BINS)


def diagnostics_of(result, deviations, scales, anomalous_groups, halves, table,
                   experiments, outliers=None) -> dict:
    """merge_diagnostics's dict from its per-observation parts: the normalised deviations'
    summary, the scale histogram and the alternate half means (h1, h2) of the anomalous
    groups (`anomalous_groups`: asu_index, centric, dstar_sq, derived; None when centric).
    outliers: outlier_summary's dict made elsewhere (a rank-local MPI job's table holds
    only one rank's rows: merging/rank_merge.py makes it from every rank's outliers)."""
    out = {
        "normalised_deviations": deviations,
        "i_over_sigma_vs_log_i": i_over_sigma_vs_log_i(result.merged),
        "scale_histogram": scales,
    }
    if outliers is not None:
        out["outliers"] = outliers
    elif table is not None:  # an unmerged MTZ carries no scaling flags
        out["outliers"] = outlier_summary(table, experiments)
    if result.statistics is not None:
        out["second_moments"] = second_moments(result.merged,
                                               result.statistics.as_dict()["shells"])
    if not result.space_group.is_centric():
        out["anomalous"] = anomalous_summary_of_halves(result, anomalous_groups, *halves)
    return out


def _scale_range(scale):
    scale = np.asarray(scale)
    lo, hi = float(scale.min()), float(scale.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


MAX_SCATTER_POINTS = 2000


def method_differences(reference, other) -> dict:
    """Merged intensities of another method against the reference method's (MergeResult
    each), over the reflections both merged: per resolution shell of the reference's
    statistics, n, the mean and rms of (I_other - I_ref) / sigma_ref; and every k-th pair
    (at most MAX_SCATTER_POINTS, in reflection order) for a scatter plot."""
    from .lookup import find_indices

    ref, oth = reference.merged, other.merged
    where = find_indices(ref.asu_index, oth.asu_index)
    both = np.flatnonzero((where >= 0) & (ref.sigma > 0))
    i_ref, i_other = ref.intensity[both], oth.intensity[where[both]]
    z = (i_other - i_ref) / ref.sigma[both]
    d = 1.0 / np.sqrt(ref.dstar_sq[both])
    shells = reference.statistics.as_dict()["shells"] if reference.statistics else []
    n, mean, rms = [], [], []
    for shell in shells:
        inside = (d <= shell["d_max"]) & (d >= shell["d_min"])
        n.append(int(inside.sum()))
        mean.append(float(z[inside].mean()) if inside.any() else None)
        rms.append(float(np.sqrt((z[inside] ** 2).mean())) if inside.any() else None)
    step = max(1, math.ceil(len(both) / MAX_SCATTER_POINTS))
    return {
        "reference": reference.method, "method": other.method, "n": int(len(both)),
        "overall_mean": float(z.mean()) if len(z) else None,
        "overall_rms": float(np.sqrt((z ** 2).mean())) if len(z) else None,
        "shells": {"d_min": [s["d_min"] for s in shells], "n": n, "mean": mean, "rms": rms},
        "scatter": {"every": step, "reference": rounded(i_ref[::step]),
                    "method": rounded(i_other[::step])},
    }


@njit(cache=True)
def alternate_half_means_kernel(permutation, group_start, intensity, sigma):
    """Inverse-variance means of the two halves of each group taken alternately in row order
    (1st, 3rd, ... observation; 2nd, 4th, ...); NaN for groups with n < 2."""
    n_groups = group_start.shape[0] - 1
    half_1 = np.full(n_groups, np.nan)
    half_2 = np.full(n_groups, np.nan)
    for g in range(n_groups):
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            continue
        sums = np.zeros(4)
        for j in range(n):
            row = permutation[start + j]
            w = 1.0 / (sigma[row] * sigma[row])
            k = 2 * (j % 2)
            sums[k] += w
            sums[k + 1] += w * intensity[row]
        half_1[g] = sums[1] / sums[0]
        half_2[g] = sums[3] / sums[2]
    return half_1, half_2


def anomalous_summary(result, groupings) -> dict:
    """dials.report's anomalous plots, for acentric Bijvoet pairs:
    - half-set anomalous differences dI1 = I+(1) - I-(1), dI2 = I+(2) - I-(2), the halves
      alternate observations of each I+ and I- group (a fixed split, not cctbx's random one),
      inverse-variance means; per resolution shell the rms correlation ratio
      rms(dI1 + dI2) / rms(dI1 - dI2) (Evans 2006: > 1 where there is anomalous signal), and
      every k-th pair (at most MAX_SCATTER_POINTS) for the scatter plot;
    - the normal probability plot of dI / sigma(dI) of the merged I+ and I- (the merging
      method's), sigma(dI) = sqrt(sigma+^2 + sigma-^2)."""
    groups = groupings.get(True)
    obs = result.observations
    h1, h2 = alternate_half_means_kernel(groups.permutation, groups.group_start,
                                         obs.intensity, obs.sigma)
    return anomalous_summary_of_halves(result, groups, h1, h2)


def anomalous_summary_of_halves(result, groups, h1, h2) -> dict:
    """anomalous_summary from the alternate half means of the anomalous groups `groups`."""
    from .statistics import (bijvoet_partner, bijvoet_partner_of, is_plus_hemisphere,
                             plus_hemisphere_of)

    partner = bijvoet_partner_of(groups)
    plus = np.flatnonzero(plus_hemisphere_of(groups, result.space_group)
                          & (partner >= 0) & ~groups.centric)
    minus = partner[plus]
    d1, d2 = h1[plus] - h1[minus], h2[plus] - h2[minus]
    ok = np.isfinite(d1) & np.isfinite(d2)
    d1, d2, d = d1[ok], d2[ok], 1.0 / np.sqrt(groups.dstar_sq[plus][ok])
    shells = result.statistics.as_dict()["shells"] if result.statistics else []
    ratio, n = [], []
    for shell in shells:
        inside = (d <= shell["d_max"]) & (d >= shell["d_min"])
        n.append(int(inside.sum()))
        spread = np.sqrt(((d1[inside] - d2[inside]) ** 2).mean()) if inside.any() else 0.0
        signal = np.sqrt(((d1[inside] + d2[inside]) ** 2).mean()) if inside.any() else 0.0
        ratio.append(float(signal / spread) if spread > 0 else None)
    step = max(1, math.ceil(len(d1) / MAX_SCATTER_POINTS))
    out = {"n_pairs": int(len(d1)),
           "correlation_ratio": {"d_min": [s["d_min"] for s in shells], "n": n,
                                 "ratio": ratio},
           "scatter": {"every": step, "delta_i_1": rounded(d1[::step]),
                       "delta_i_2": rounded(d2[::step])}}
    merged = result.merged_anomalous
    if merged is not None and len(merged):
        if np.array_equal(merged.asu_index, groups.asu_index):
            # the merged reflections are the anomalous grouping's groups in its order: its
            # partners and hemisphere, computed once for the statistics, are theirs
            partner = bijvoet_partner_of(groups)
            plus_hemisphere = plus_hemisphere_of(groups, result.space_group)
        else:
            partner = bijvoet_partner(merged.asu_index)
            plus_hemisphere = is_plus_hemisphere(merged.asu_index, result.space_group)
        plus = np.flatnonzero(plus_hemisphere & (partner >= 0))
        minus = partner[plus]
        sigma = np.sqrt(merged.sigma[plus] ** 2 + merged.sigma[minus] ** 2)
        use = sigma > 0
        delta = np.sort((merged.intensity[plus] - merged.intensity[minus])[use] / sigma[use])
        if len(delta):
            k = np.unique(np.round(np.linspace(0, len(delta) - 1,
                                               min(QUANTILE_POINTS, len(delta)))).astype(np.int64))
            out["normal_plot"] = {"n": int(len(delta)),
                                  "expected": rounded(normal_quantiles(len(delta), k)),
                                  "observed": rounded(delta[k])}
    return out
