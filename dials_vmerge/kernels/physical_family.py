"""The smooth-rotation family (physical and dose_decay models) of every dataset in one kernel.

    g = S * exp(E) * A * F,   S = sum_j ws_j p[s0 + j],   E = sum_j we_j p[e0 + j],
    A = 1 + sum_k c_k p[a0 + k],   F = fixed (analytical) factor

The per-row inputs are those of the fused physical target pass (scaling/physical_pass.py),
in its layout: record (n, 8) with the 3 scale weights in columns 2:5 and the 3 exponent
weights in columns 5:8 (columns 0, 1, the intensity and weight, are not read here);
first_param (n, 2) the first scale and exponent parameter of each row, absorption
coefficients (n, L) with the first absorption parameter, and the fixed factor. Parameter
indices point into the "full" vector: every dataset's whole parameter vector, concatenated,
then the pass's guard entries; `free_col_of_full` maps each full entry to its column of the
global free vector (-1: fixed, or a guard entry).

Output in the ELL form of the scaling target: slots 0-2 dg/dS weights, 3-5 the exponent
weights, 6.. the absorption coefficients; each value is the weight times the product of the
other factors (the product rule), each column the free column of the parameter.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .size_dispatch import parallel_when_large

SCALE_WEIGHT_COLUMN = 2  # record columns of the fused pass (scaling/physical_pass.py)
EXPONENT_WEIGHT_COLUMN = 5
SMOOTH_SLOTS = 6


@parallel_when_large
def smooth_rotation_family_kernel(record, first_param, absorption_coefficients,
                                  absorption_first, fixed_factor, parameters,
                                  free_col_of_full, g, deriv_values, deriv_col):
    n = record.shape[0]
    for i in prange(n):
        p0 = first_param[i, 0]
        q0 = first_param[i, 1]
        s = (record[i, 2] * parameters[p0] + record[i, 3] * parameters[p0 + 1]
             + record[i, 4] * parameters[p0 + 2])
        e = math.exp(record[i, 5] * parameters[q0] + record[i, 6] * parameters[q0 + 1]
                     + record[i, 7] * parameters[q0 + 2])
        a = 1.0
        if absorption_coefficients is not None:
            a0 = absorption_first[i]
            for k in range(absorption_coefficients.shape[1]):
                a += absorption_coefficients[i, k] * parameters[a0 + k]
        f = 1.0
        if fixed_factor is not None:
            f = fixed_factor[i]
        value = s * e * a * f
        g[i] = value
        not_scale = e * a * f
        for j in range(3):
            deriv_values[i, j] = record[i, 2 + j] * not_scale
            deriv_col[i, j] = free_col_of_full[p0 + j]
            deriv_values[i, 3 + j] = record[i, 5 + j] * value
            deriv_col[i, 3 + j] = free_col_of_full[q0 + j]
        if absorption_coefficients is not None:
            a0 = absorption_first[i]
            not_absorption = s * e * f
            for k in range(absorption_coefficients.shape[1]):
                deriv_values[i, 6 + k] = absorption_coefficients[i, k] * not_absorption
                deriv_col[i, 6 + k] = free_col_of_full[a0 + k]


@parallel_when_large
def smooth_rotation_family_g_kernel(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters, g):
    n = record.shape[0]
    for i in prange(n):
        p0 = first_param[i, 0]
        q0 = first_param[i, 1]
        s = (record[i, 2] * parameters[p0] + record[i, 3] * parameters[p0 + 1]
             + record[i, 4] * parameters[p0 + 2])
        e = math.exp(record[i, 5] * parameters[q0] + record[i, 6] * parameters[q0 + 1]
                     + record[i, 7] * parameters[q0 + 2])
        a = 1.0
        if absorption_coefficients is not None:
            a0 = absorption_first[i]
            for k in range(absorption_coefficients.shape[1]):
                a += absorption_coefficients[i, k] * parameters[a0 + k]
        f = 1.0
        if fixed_factor is not None:
            f = fixed_factor[i]
        g[i] = s * e * a * f


def n_slots(absorption_coefficients) -> int:
    return SMOOTH_SLOTS + (0 if absorption_coefficients is None
                           else absorption_coefficients.shape[1])


def evaluate_smooth_rotation_family(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters,
                                    free_col_of_full):
    """(g (n,), deriv_values (n, K), deriv_col (n, K) int32) for every row at once."""
    n = record.shape[0]
    k = n_slots(absorption_coefficients)
    g = np.empty(n)
    values = np.empty((n, k))
    cols = np.empty((n, k), dtype=np.int32)
    smooth_rotation_family_kernel(record, first_param, absorption_coefficients,
                                  absorption_first, fixed_factor, parameters,
                                  free_col_of_full, g, values, cols)
    return g, values, cols


def evaluate_smooth_rotation_family_g(record, first_param, absorption_coefficients,
                                      absorption_first, fixed_factor, parameters):
    g = np.empty(record.shape[0])
    smooth_rotation_family_g_kernel(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters, g)
    return g
