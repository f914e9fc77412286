"""Rows outside their dataset's valid image ranges, all datasets in one pass.

Per dataset a list of valid ranges (first, last) in image numbers, stored flat: the ranges of
dataset d are range_first/range_last[range_offsets[d]:range_offsets[d + 1]]. A row of dataset
d is inside if first - 1 <= z_obs <= last for one of them (z_obs in pixels/images, image n
spanning z from n - 1 to n). Rows with dataset index -1 (stills, rows of no dataset) are never
flagged. O(rows x ranges of the row's dataset): no scan of the table per dataset.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _outside_kernel(dataset_index, z_obs, range_offsets, range_first, range_last):
    outside = np.zeros(dataset_index.size, np.bool_)
    for i in range(dataset_index.size):
        d = dataset_index[i]
        if d < 0:
            continue
        z = z_obs[i]
        inside = False
        for r in range(range_offsets[d], range_offsets[d + 1]):
            if z >= range_first[r] - 1.0 and z <= range_last[r]:
                inside = True
                break
        outside[i] = not inside
    return outside


def rows_outside_valid_ranges(dataset_index, z_obs, ranges_per_dataset):
    """Boolean per row: True where the row's dataset has valid ranges and z_obs lies in none.

    dataset_index: per row, the dataset's position in ranges_per_dataset, or -1 to skip.
    ranges_per_dataset: per dataset, a sequence of (first, last) image numbers (an empty
    sequence flags every row of that dataset)."""
    counts = np.array([len(r) for r in ranges_per_dataset], dtype=np.int64)
    range_offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=range_offsets[1:])
    pairs = np.array([pair for ranges in ranges_per_dataset for pair in ranges],
                     dtype=np.float64).reshape(-1, 2)
    index = np.ascontiguousarray(dataset_index, dtype=np.int64)
    if index.size and index.max() >= counts.size:
        raise ValueError("dataset index out of range")
    return _outside_kernel(index, np.ascontiguousarray(z_obs, dtype=np.float64), range_offsets,
                           np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1]))
