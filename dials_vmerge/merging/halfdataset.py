"""Cross-validation by repeated random half-dataset splits by image (batch).

Each repeat shuffles the distinct batches (seeded) and splits them into two equal halves
(numpy array_split, as the reciprocalspaceship notebooks do); each half is merged with the
chosen method, and per resolution shell CC1/2 (I of half 1 against half 2) and CCanom
(I(+) - I(-) of acentric reflections, both halves) are computed with Pearson and Spearman
correlation. Reported: mean and SD over the repeats. For the variational method the Wilson
Sigma(d) is taken from the full data and held fixed (only the closed-form posterior is
recomputed per half), as section 7.5 of variational-merging.md suggests.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .groups import Groupings
from .lookup import find_indices
from .statistics import equal_volume_limits, pearson, shell_of, symmetry_compatible_cell


def split_batches(batches: np.ndarray, rng) -> np.ndarray:
    """The batches of the first half for one repeat."""
    unique = np.unique(batches)
    shuffled = rng.permutation(unique)
    first, _ = np.array_split(shuffled, 2)
    return np.sort(first)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy.stats.rankdata's
    'average', which would cost ~25 MB of memory to import); all NaN if any value is NaN,
    as rankdata propagates NaN."""
    values = np.asarray(values, dtype=np.float64).ravel()
    n = len(values)
    if n and np.isnan(values).any():
        return np.full(n, np.nan)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    count = np.diff(np.append(first, n))
    # positions first..first+count-1 hold ranks first+1..first+count: their mean
    ranks = np.empty(n)
    ranks[order] = np.repeat(first + (count + 1) / 2.0, count)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    return pearson(average_ranks(x), average_ranks(y))


def _correlations(a, b, shell, n_bins):
    out = np.zeros((2, n_bins + 1))
    counts = np.zeros(n_bins + 1, dtype=np.int64)
    for k in range(n_bins + 1):
        sel = shell == k if k < n_bins else shell >= 0
        out[0, k] = pearson(a[sel], b[sel])
        out[1, k] = spearman(a[sel], b[sel])
        counts[k] = int(sel.sum())
    return out, counts


def half_dataset_statistics(
    miller_index, intensity, sigma, batch, space_group, unit_cell,
    merge: Callable, repeats: int = 10, seed: int = 0, n_bins: int = 20,
    groupings: Optional[Groupings] = None,
):
    """`merge(groups, intensity, sigma, full_groups_or_None)` returns merged intensities
    aligned to `groups`. Returns a JSON-able dict of per-shell mean/SD correlations.
    groupings: the Groupings of these observations if the caller has them; each half's
    groupings are derived from them (the same as grouping the half afresh)."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    batch = np.asarray(batch, dtype=np.int64)
    unit_cell = symmetry_compatible_cell(unit_cell, space_group)
    limits, d_ranges = equal_volume_limits(unit_cell, miller_index, n_bins)
    if groupings is None:
        groupings = Groupings(miller_index, space_group, unit_cell)
    full = groupings.get(False, unit_cell)
    full_anom = groupings.get(True, unit_cell)
    context = {"full": full, "full_anom": full_anom}
    merge_context = merge.prepare(context, intensity, sigma) if hasattr(merge, "prepare") else None
    rng = np.random.default_rng(seed)
    cc_half = []
    cc_anom = []
    n_half = n_anom = None
    for _ in range(int(repeats)):
        first = np.isin(batch, split_batches(batch, rng))
        halves = []
        halves_anom = []
        for mask in (first, ~first):
            g = full.subset(mask)
            ga = full_anom.subset(mask)
            halves.append((g, merge(g, intensity[mask], sigma[mask], merge_context, False)))
            halves_anom.append((ga, merge(ga, intensity[mask], sigma[mask], merge_context, True)))
        (g1, i1), (g2, i2) = halves
        match = find_indices(g1.asu_index, g2.asu_index)
        ok = match >= 0
        shell = shell_of(g1.dstar_sq[ok], limits)
        values, n_half = _correlations(i1[ok], i2[match[ok]], shell, n_bins)
        cc_half.append(values)
        delta = []
        for ga, ia in halves_anom:
            partner = find_indices(-ga.asu_index, ga.asu_index)
            plus = _plus(ga.asu_index, space_group) & (partner >= 0) & ~ga.centric
            delta.append((ga.asu_index[plus], ia[plus] - ia[partner[plus]], ga.dstar_sq[plus]))
        (h1, d1, s1), (h2, d2, _) = delta
        match = find_indices(h1, h2)
        ok = match >= 0
        shell = shell_of(s1[ok], limits)
        values, n_anom = _correlations(d1[ok], d2[match[ok]], shell, n_bins)
        cc_anom.append(values)
    return half_dataset_summary(cc_half, n_half, cc_anom, n_anom, d_ranges, repeats, seed,
                                n_bins)


def half_dataset_summary(cc_half, n_half, cc_anom, n_anom, d_ranges, repeats, seed, n_bins):
    """The JSON-able result from each repeat's (2, n_bins + 1) correlations (Pearson,
    Spearman by shell, then overall) and the last repeat's counts (the MPI ranks' version,
    rank_halfdataset.py, ends here too)."""
    cc_half = np.array(cc_half)
    cc_anom = np.array(cc_anom)

    def summary(values, counts):
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        shells = []
        for k in range(n_bins):
            shells.append({
                "d_max": d_ranges[k][0], "d_min": d_ranges[k][1], "n": int(counts[k]),
                "pearson_mean": float(mean[0, k]), "pearson_sd": float(sd[0, k]),
                "spearman_mean": float(mean[1, k]), "spearman_sd": float(sd[1, k]),
            })
        overall = {"n": int(counts[n_bins]),
                   "pearson_mean": float(mean[0, n_bins]), "pearson_sd": float(sd[0, n_bins]),
                   "spearman_mean": float(mean[1, n_bins]), "spearman_sd": float(sd[1, n_bins])}
        return {"shells": shells, "overall": overall}

    return {
        "repeats": int(repeats), "seed": int(seed), "n_bins": int(n_bins),
        "cc_half": summary(cc_half, n_half),
        "cc_anom": summary(cc_anom, n_anom),
    }


def _plus(asu_index, space_group):
    from .statistics import is_plus_hemisphere

    return is_plus_hemisphere(asu_index, space_group)


def format_half_dataset_table(results_by_method: dict) -> str:
    """Per-shell Pearson/Spearman CC1/2 and CCanom (mean +- SD), methods side by side."""
    methods = list(results_by_method)
    first = results_by_method[methods[0]]
    names = "%13s" % ""
    head = "%6s %6s" % ("d_max", "d_min")
    for m in methods:
        names += "  %-32s" % m
        head += "  %-12s %-12s %6s" % ("CC1/2 Pears.", "CC1/2 Spear.", "CCanoS")
    lines = [f"Half-dataset cross-validation ({first['repeats']} random splits by batch,"
             f" seed {first['seed']}; mean +- SD; CCanoS = Spearman CCanom)", names, head]
    n_bins = first["n_bins"]
    for k in range(n_bins + 1):
        key = (lambda r: r["shells"][k]) if k < n_bins else (lambda r: r["overall"])
        if k < n_bins:
            shell = first["cc_half"]["shells"][k]
            row = "%6.2f %6.2f" % (shell["d_max"], shell["d_min"])
        else:
            row = "%13s" % "overall"
        for m in methods:
            half = key(results_by_method[m]["cc_half"])
            anom = key(results_by_method[m]["cc_anom"])
            row += "  %5.3f+-%5.3f %5.3f+-%5.3f %6.3f" % (
                half["pearson_mean"], half["pearson_sd"], half["spearman_mean"],
                half["spearman_sd"], anom["spearman_mean"])
        lines.append(row)
    return "\n".join(lines)
