"""The flat layout: rows of all datasets in one table, a dataset index per row.

rows_by_dataset is the one way to go from a per-row dataset index to per-dataset row lists:
a counting sort, O(rows + datasets), so no caller ever scans all rows once per dataset.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _counting_sort(dataset_index, n_datasets):
    counts = np.zeros(n_datasets + 1, np.int64)
    for i in range(dataset_index.size):
        counts[dataset_index[i] + 1] += 1
    for d in range(n_datasets):
        counts[d + 1] += counts[d]
    order = np.empty(dataset_index.size, np.int64)
    fill = counts[:-1].copy()
    for i in range(dataset_index.size):
        d = dataset_index[i]
        order[fill[d]] = i
        fill[d] += 1
    return order, counts


def rows_by_dataset(dataset_index, n_datasets):
    """(order, offsets): positions of the rows of dataset d are order[offsets[d]:offsets[d+1]],
    ascending. dataset_index: per row, in 0..n_datasets-1."""
    index = np.ascontiguousarray(dataset_index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= n_datasets):
        raise ValueError("dataset index out of range")
    return _counting_sort(index, int(n_datasets))


def split_positions(dataset_index, n_datasets):
    """Per dataset, the ascending positions of its rows (views into one array)."""
    order, offsets = rows_by_dataset(dataset_index, n_datasets)
    return [order[offsets[d]:offsets[d + 1]] for d in range(n_datasets)]


def scatter_mask(dataset_index, local_row, mask, sizes):
    """Per dataset a boolean array of `sizes[d]` rows, True at local_row of the masked rows
    of that dataset: the flat mask taken back to per-dataset row arrays in one pass."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.zeros(int(offsets[-1]), dtype=bool)
    keep = np.flatnonzero(mask)
    flat[offsets[np.asarray(dataset_index)[keep]] + np.asarray(local_row)[keep]] = True
    return [flat[offsets[d]:offsets[d + 1]] for d in range(sizes.size)]


def gather_by_dataset(per_dataset, dataset_index, local_row, dtype=np.float64):
    """values[i] = per_dataset[dataset_index[i]][local_row[i]] in one concatenation and one
    fancy-index (per_dataset: one array per dataset, first axis its rows)."""
    sizes = [len(a) for a in per_dataset]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if not per_dataset:
        return np.zeros(0, dtype=dtype)
    flat = np.concatenate([np.asarray(a, dtype=dtype) for a in per_dataset])
    return flat[offsets[np.asarray(dataset_index)] + np.asarray(local_row)]


def dataset_keyed_indices(per_dataset_asu):
    """ASU indices (N, 3) of several datasets, concatenated, with h shifted per dataset so
    that a sort by (h, k, l) is a sort by (dataset, h, k, l): groups of one table never mix
    datasets, and within a dataset they are ordered as in that dataset's own table."""
    parts = [np.asarray(a, dtype=np.int64).reshape(-1, 3) for a in per_dataset_asu]
    asu = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    if asu.size == 0:
        return asu.astype(np.int32)
    h_low, h_span = asu[:, 0].min(), asu[:, 0].max() - asu[:, 0].min() + 1
    dataset = np.repeat(np.arange(len(parts), dtype=np.int64), [p.shape[0] for p in parts])
    keyed = asu.copy()
    keyed[:, 0] = (asu[:, 0] - h_low) + dataset * h_span
    if keyed[:, 0].max() >= np.iinfo(np.int32).max:
        raise ValueError("too many datasets for dataset-keyed ASU indices")
    return keyed.astype(np.int32)
