"""Permuting an array in place: values[:] = values[order] without a second array.

Used where several per-row arrays are put into one order one after another and a copy of
each beside its original was the peak RSS (the Imid search, issue 10 memory). Only moves
values, so the result equals values[order] bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _permute_cycles(values, order, done):
    # new[i] = old[order[i]], cycle by cycle: each cycle's first value is held aside
    n = values.shape[0]
    for start in range(n):
        if done[start]:
            continue
        held = values[start]
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                values[i] = held
                break
            values[i] = values[j]
            i = j


def permute_in_place(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """values[:] = values[order] for a 1-D contiguous array and a permutation `order` of
    0..n-1 (not checked: anything else scrambles values); returns values."""
    if values.ndim != 1 or not values.flags.c_contiguous or order.shape != values.shape:
        raise ValueError("permute_in_place: a 1-D contiguous array and an order of its length")
    _permute_cycles(values, order, np.zeros(values.shape[0], dtype=np.bool_))
    return values
