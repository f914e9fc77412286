"""The counting sort of packed ASU keys into groups, in O(rows + span) time and one array of
span + 1 counts.

The general counting sort (kernels/flat.rows_by_dataset) returns every key's offset, and its
callers' `np.diff` over them; for the anomalous ASU keys of a 1e6-observation sweep the span
is ~3.2e6 keys, and those int64 arrays (counts, fill pointers, diff, mask: ~90 MB) were the
peak of the error-model step. Here the counts are int32 when the rows allow, the fill
pointers are the counts themselves, and the group offsets are compacted in the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _grouped_counting_sort(keys, counts):
    """counts: zeros, span + 1 entries (keys in 0..span-1). Returns (order, group_start)."""
    n = keys.size
    span = counts.size - 1
    for i in range(n):
        counts[keys[i] + 1] += 1
    n_groups = 0
    for k in range(span):
        if counts[k + 1] > 0:
            n_groups += 1
        counts[k + 1] += counts[k]
    # counts[k] is now where key k's rows start; filling moves it to where they end
    order = np.empty(n, np.int64)
    for i in range(n):
        k = keys[i]
        order[counts[k]] = i
        counts[k] += 1
    group_start = np.empty(n_groups + 1, np.int64)
    group_start[0] = 0
    g = 0
    previous_end = 0
    for k in range(span):
        end = counts[k]
        if end > previous_end:
            g += 1
            group_start[g] = end
            previous_end = end
    return order, group_start


def grouped_counting_sort(keys, span):
    """(order, group_start) of keys in 0..span-1: the stable argsort of keys, and the
    offsets of its runs of equal keys (empty keys have no group)."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= span):
        raise ValueError("key out of range")
    counts = np.zeros(int(span) + 1, np.int32 if keys.size < 2 ** 31 - 1 else np.int64)
    return _grouped_counting_sort(keys, counts)
