"""The KB family (g = K exp(B / 2d^2) [x fixed factor]) of every dataset in one kernel.

Per row: its dataset index and 1/(2 d^2) (and the fixed analytical factor, when any
dataset has one; 1 elsewhere). Per dataset: the current K and B (1 and 0 for a model
without that component) and the column of each in the global free-parameter vector (-1:
absent or fixed). Output in the ELL form of the scaling target: slot 0 dg/dK, slot 1 dg/dB.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

SLOTS = 2


@njit(cache=True, parallel=True)
def kb_family_kernel(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value,
                     scale_col, decay_col, g, deriv_values, deriv_col):
    for i in prange(row_dataset.size):
        d = row_dataset[i]
        k = scale_value[d]
        e = math.exp(decay_value[d] * inv_two_d_sq[i])
        f = 1.0
        if fixed_factor is not None:
            f = fixed_factor[i]
        g[i] = k * e * f
        deriv_values[i, 0] = e * f
        deriv_values[i, 1] = e * inv_two_d_sq[i] * k * f
        deriv_col[i, 0] = scale_col[d]
        deriv_col[i, 1] = decay_col[d]


@njit(cache=True, parallel=True)
def kb_family_g_kernel(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value, g):
    for i in prange(row_dataset.size):
        d = row_dataset[i]
        f = 1.0
        if fixed_factor is not None:
            f = fixed_factor[i]
        g[i] = scale_value[d] * math.exp(decay_value[d] * inv_two_d_sq[i]) * f


def evaluate_kb_family(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value,
                       scale_col, decay_col):
    """(g (n,), deriv_values (n, 2), deriv_col (n, 2) int32) for every row at once."""
    n = row_dataset.size
    g = np.empty(n)
    values = np.empty((n, SLOTS))
    cols = np.empty((n, SLOTS), dtype=np.int32)
    kb_family_kernel(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value,
                     scale_col, decay_col, g, values, cols)
    return g, values, cols


def evaluate_kb_family_g(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value):
    g = np.empty(row_dataset.size)
    kb_family_g_kernel(row_dataset, inv_two_d_sq, fixed_factor, scale_value, decay_value, g)
    return g
