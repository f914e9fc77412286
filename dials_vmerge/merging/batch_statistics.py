"""Statistics against batch (image), the table a user reads `exclude_batches=` ranges from.

Per batch (global batch number, batches.batch_numbers), over the merged observations
(scaled I/g, sigma/g; rows bad for scaling are not there):
- n_obs; mean_scale: mean inverse scale factor g of the batch's observations;
- i_over_sigma: mean of the observations' I/sigma;
- r_merge: sum |I - <I>| / sum I over the batch's observations of unique reflections with
  n > 1, <I> the merged intensity of the chosen merging method (dials.scale's Rmerge against
  batch, with the method's merged value instead of the inverse-variance mean);
- cc_rest: Pearson correlation of each observation's I with the inverse-variance mean of the
  other observations of its unique reflection (n > 1). This is the per-image-group stand-in
  for CC1/2: an image group whose intensities disagree with the rest of the data (damage,
  a wrong scale) falls; dials.scale has no such column;
- completeness: cumulative completeness in batch order (unique reflections seen in this or
  an earlier batch / the complete set to the data's d_min, systematic absences excluded).

The per-batch sums are additive, so the binned table (at most ~`max_rows` rows, each
multi-image dataset binned on its own, single-image datasets (stills) binned together) is
computed from the same sums as the per-batch table.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Per-batch sums, columns of the array batch_sums_kernel returns.
(N_OBS, SUM_SCALE, SUM_ISIG, R_NUM, R_DEN, CC_N, CC_X, CC_Y, CC_XX, CC_YY, CC_XY,
 N_NEW) = range(12)
N_SUMS = 12
DEFAULT_MAX_ROWS = 50


@njit(cache=True)
def batch_sums_kernel(permutation, group_start, intensity, sigma, scale, batch_index,
                      merged_intensity, in_complete_set, n_batches):
    """Sums per batch over the observations, read group by group through `permutation`.

    Returns float64 (n_batches, N_SUMS); N_NEW counts the unique reflections whose earliest
    observation (lowest batch index) lies in the batch, for groups in_complete_set."""
    sums = np.zeros((n_batches, 12))
    add_batch_sums_kernel(sums, permutation, group_start, intensity, sigma, scale,
                          batch_index, merged_intensity, in_complete_set)
    return sums


@njit(cache=True)
def add_batch_sums_kernel(sums, permutation, group_start, intensity, sigma, scale,
                          batch_index, merged_intensity, in_complete_set):
    """batch_sums_kernel's sums of these groups added to `sums` in place, group by group:
    groups split into consecutive runs (MPI ranks' groups, merging/rank_merge.py) and
    added run after run give the bits of one pass over all of them."""
    n_batches = sums.shape[0]
    n_groups = group_start.shape[0] - 1
    for g in range(n_groups):
        start = group_start[g]
        stop = group_start[g + 1]
        n = stop - start
        sum_w = 0.0
        sum_wi = 0.0
        first = n_batches
        for k in range(start, stop):
            row = permutation[k]
            w = 1.0 / (sigma[row] * sigma[row])
            sum_w += w
            sum_wi += w * intensity[row]
            if batch_index[row] < first:
                first = batch_index[row]
        if first < n_batches and in_complete_set[g]:
            sums[first, 11] += 1.0
        mean = merged_intensity[g]
        for k in range(start, stop):
            row = permutation[k]
            b = batch_index[row]
            i = intensity[row]
            sums[b, 0] += 1.0
            sums[b, 1] += scale[row]
            sums[b, 2] += i / sigma[row]
            if n > 1:
                sums[b, 3] += abs(i - mean)
                sums[b, 4] += i
                w = 1.0 / (sigma[row] * sigma[row])
                rest = (sum_wi - w * i) / (sum_w - w)
                sums[b, 5] += 1.0
                sums[b, 6] += i
                sums[b, 7] += rest
                sums[b, 8] += i * i
                sums[b, 9] += rest * rest
                sums[b, 10] += i * rest


def _values(sums: np.ndarray, new_cumulative: np.ndarray, n_complete: int) -> dict:
    """Statistics from (rows, N_SUMS) sums; NaN where undefined (JSON null)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = sums[:, N_OBS]
        mean_scale = sums[:, SUM_SCALE] / n
        i_over_sigma = sums[:, SUM_ISIG] / n
        r_merge = np.where(sums[:, R_DEN] > 0, sums[:, R_NUM] / sums[:, R_DEN], np.nan)
        m = sums[:, CC_N]
        cov = sums[:, CC_XY] - sums[:, CC_X] * sums[:, CC_Y] / m
        var_x = sums[:, CC_XX] - sums[:, CC_X] ** 2 / m
        var_y = sums[:, CC_YY] - sums[:, CC_Y] ** 2 / m
        cc = np.where((m >= 2) & (var_x > 0) & (var_y > 0), cov / np.sqrt(var_x * var_y),
                      np.nan)
        completeness = new_cumulative / n_complete if n_complete else np.full(len(n), np.nan)
    return {"n_obs": n.astype(np.int64), "mean_scale": mean_scale,
            "i_over_sigma": i_over_sigma, "r_merge": r_merge, "cc_rest": cc,
            "cc_rest_n": m.astype(np.int64), "completeness": completeness}


def complete_set_size(space_group, unit_cell, d_min: float) -> int:
    """Unique reflections (non-anomalous, systematic absences excluded) to d_min."""
    from cctbx import crystal, miller

    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    return int(miller.build_set(symmetry, anomalous_flag=False, d_min=d_min * (1 - 1e-6))
               .remove_systematic_absences().size())


def systematically_absent(asu_index, space_group) -> np.ndarray:
    """Mask of the indices that the space group makes systematically absent."""
    from cctbx import crystal, miller

    from .groups import flex_indices

    if len(asu_index) == 0:
        return np.zeros(0, bool)
    symmetry = crystal.symmetry(space_group=space_group)
    absent = miller.set(symmetry, flex_indices(asu_index), anomalous_flag=False)
    return absent.sys_absent_flags().data().as_numpy_array().astype(bool)


def batch_bins(batches: np.ndarray, dataset_of_batch: np.ndarray, single_image: np.ndarray,
               max_rows: int = DEFAULT_MAX_ROWS) -> list:
    """Consecutive runs of positions into `batches` (sorted), at most ~max_rows of them:
    each multi-image dataset is binned on its own, runs of single-image datasets together;
    every bin holds at most ceil(len(batches) / max_rows) batches."""
    n = len(batches)
    if n == 0:
        return []
    width = max(1, math.ceil(n / max_rows))
    bins = []
    start = 0
    for k in range(1, n + 1):
        boundary = k == n or (
            dataset_of_batch[k] != dataset_of_batch[k - 1]
            and not (single_image[k] and single_image[k - 1]))
        if boundary or k - start == width:
            bins.append((start, k))
            start = k
    return bins


def unique_batches(batch):
    """np.unique(batch, return_inverse=True) of int64 batch numbers: (the sorted distinct
    batches, each row's index among them, int64). Batch numbers span few values (one per
    image), so a presence table over their range replaces numpy's sort of every row (~50 ms
    for a 1e6 sweep; issue 10). Same arrays; numpy's unique where the range is wide."""
    batch = np.asarray(batch, dtype=np.int64).reshape(-1)
    if batch.size:
        low = int(batch.min())
        span = int(batch.max()) - low + 1
        if span <= max(batch.size, 1 << 16):
            offset = batch - low
            present = np.zeros(span, dtype=bool)
            present[offset] = True
            rank = np.cumsum(present, dtype=np.int64)
            rank -= 1
            return np.flatnonzero(present) + low, rank[offset]
    batches, batch_index = np.unique(batch, return_inverse=True)
    return batches, batch_index.astype(np.int64).reshape(-1)


def batch_statistics(groups, intensity, sigma, scale, batch, merged_intensity, experiments,
                     space_group, unit_cell, method: str, max_rows: int = DEFAULT_MAX_ROWS
                     ) -> dict:
    """The per-batch and binned tables (JSON-ready dict, see the module docstring).

    groups: the non-anomalous GroupedObservations of the observations; merged_intensity:
    the method's merged I per group (same order)."""
    batch = np.asarray(batch, dtype=np.int64)
    batches, batch_index = unique_batches(batch)
    sums = batch_sums_kernel(groups.permutation, groups.group_start, intensity, sigma,
                             np.asarray(scale, dtype=np.float64), batch_index,
                             np.asarray(merged_intensity, dtype=np.float64),
                             ~systematically_absent(groups.asu_index, space_group), len(batches))
    d_min = float(1.0 / math.sqrt(groups.dstar_sq.max())) if groups.n_groups else 0.0
    return batch_tables(sums, batches, d_min, experiments, space_group, unit_cell, method,
                        max_rows)


def batch_tables(sums, batches, d_min, experiments, space_group, unit_cell, method: str,
                 max_rows: int = DEFAULT_MAX_ROWS) -> dict:
    """batch_statistics's tables from the per-batch sums (batch_sums_kernel) of the batches
    `batches` (sorted) and the data's d_min (0 when there is no group)."""
    from ..batches import batch_offsets, batch_ranges

    n_complete = complete_set_size(space_group, unit_cell, d_min) if d_min > 0 else 0
    seen = np.cumsum(sums[:, N_NEW])

    ranges = batch_ranges(experiments, batch_offsets(experiments))
    dataset_of_batch = np.full(len(batches), -1, dtype=np.int64)
    for k, (lo, hi) in enumerate(ranges):
        dataset_of_batch[(batches >= lo) & (batches <= hi)] = k
    single_image = np.array([e.is_still or lo == hi for e, (lo, hi) in zip(experiments, ranges)]
                            + [True])[dataset_of_batch]

    per_batch = {"batch": batches, "dataset": dataset_of_batch,
                 **_values(sums, seen, n_complete)}
    bins = batch_bins(batches, dataset_of_batch, single_image, max_rows)
    binned_sums = np.array([sums[a:b].sum(axis=0) for a, b in bins]).reshape(-1, N_SUMS)
    binned = {"batch_first": np.array([batches[a] for a, _ in bins], dtype=np.int64),
              "batch_last": np.array([batches[b - 1] for _, b in bins], dtype=np.int64),
              "dataset": np.array([dataset_of_batch[a] for a, _ in bins], dtype=np.int64),
              **_values(binned_sums, np.array([seen[b - 1] for _, b in bins]), n_complete)}
    return {
        "method": method,
        "n_complete": n_complete,
        "batch_ranges": [[int(lo), int(hi)] for lo, hi in ranges],
        "per_batch": _jsonable(per_batch),
        "binned": _jsonable(binned),
    }


def _jsonable(columns: dict) -> dict:
    out = {}
    for key, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind == "f":
            # 6 significant digits: the table is for reading and plotting, and the report
            # embeds it (size grows with the number of batches)
            out[key] = [float(f"{v:.6g}") if math.isfinite(v) else None for v in values.tolist()]
        else:
            out[key] = [int(v) for v in values.tolist()]
    return out


BATCH_TABLE_HEADER = ("  batches       #obs  <scale>  <I/sI>   Rmerge  CC(rest)  %compl.")


def format_batch_statistics(table: dict) -> str:
    """The log's short per-batch table (the binned rows)."""
    binned = table["binned"]

    def value(x, fmt, width):
        return (fmt % x) if x is not None else "-".rjust(width)

    lines = [f"Statistics against batch (merging.method={table['method']}; CC(rest): "
             "correlation of I with the mean of its other observations; completeness "
             "cumulative):", BATCH_TABLE_HEADER]
    for k in range(len(binned["batch_first"])):
        lo, hi = binned["batch_first"][k], binned["batch_last"][k]
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        completeness = binned["completeness"][k]
        lines.append("  %-11s %7d  %s  %s  %s  %s  %s" % (
            span, binned["n_obs"][k], value(binned["mean_scale"][k], "%7.3f", 7),
            value(binned["i_over_sigma"][k], "%6.2f", 6), value(binned["r_merge"][k], "%7.3f", 7),
            value(binned["cc_rest"][k], "%8.3f", 8),
            value(None if completeness is None else 100 * completeness, "%7.1f", 7)))
    return "\n".join(lines)
