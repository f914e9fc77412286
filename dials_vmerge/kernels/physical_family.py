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
from numba import njit, prange

from .size_dispatch import parallel_when_large
from .smoother_weights import MAX_AVERAGE, index_range, position, sigma_of
from .variance_of_g import variance_of_g_row

SCALE_WEIGHT_COLUMN = 2  # record columns of the fused pass (scaling/physical_pass.py)
EXPONENT_WEIGHT_COLUMN = 5
SMOOTH_SLOTS = 6


@njit(cache=True)
def _row_factors(i, record, first_param, absorption_coefficients, absorption_first,
                 fixed_factor, parameters):
    """(S, exp(B), A, F) of row i: g = S exp(B) A F (the fused pass's record layout)."""
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
    return s, e, a, f


# Rows per block of the derivative expansion (scaling/family.py evaluate_all_rows: var(g) of
# every row in blocks, so that no (n, K) derivative table of all rows exists). The block's
# kernels take their parallel build from this size on, below the default threshold: a 1e6
# sweep's final expansion is ~60 such blocks, which ran on one thread (issue 10). Their rows
# are independent, so both builds give the same bits.
DERIVATIVE_BLOCK_ROWS = 16384


@njit(cache=True)
def _row_g_and_derivatives(i, record, first_param, absorption_coefficients,
                           absorption_first, fixed_factor, parameters, free_col_of_full,
                           deriv_values, deriv_col, out_row):
    """g of row i, its ELL derivatives written into row out_row of deriv_values/deriv_col."""
    s, e, a, f = _row_factors(i, record, first_param, absorption_coefficients,
                              absorption_first, fixed_factor, parameters)
    value = s * e * a * f
    p0 = first_param[i, 0]
    q0 = first_param[i, 1]
    not_scale = e * a * f
    for j in range(3):
        deriv_values[out_row, j] = record[i, 2 + j] * not_scale
        deriv_col[out_row, j] = free_col_of_full[p0 + j]
        deriv_values[out_row, 3 + j] = record[i, 5 + j] * value
        deriv_col[out_row, 3 + j] = free_col_of_full[q0 + j]
    if absorption_coefficients is not None:
        a0 = absorption_first[i]
        not_absorption = s * e * f
        for k in range(absorption_coefficients.shape[1]):
            deriv_values[out_row, 6 + k] = absorption_coefficients[i, k] * not_absorption
            deriv_col[out_row, 6 + k] = free_col_of_full[a0 + k]
    return value


@parallel_when_large(min_rows=DERIVATIVE_BLOCK_ROWS)
def smooth_rotation_family_kernel(record, first_param, absorption_coefficients,
                                  absorption_first, fixed_factor, parameters,
                                  free_col_of_full, g, deriv_values, deriv_col):
    n = record.shape[0]
    for i in prange(n):
        g[i] = _row_g_and_derivatives(i, record, first_param, absorption_coefficients,
                                      absorption_first, fixed_factor, parameters,
                                      free_col_of_full, deriv_values, deriv_col, i)


# Rows per thread's turn in the fused variance kernel (its scratch row is reused across them).
VARIANCE_CHUNK_ROWS = 1024


@parallel_when_large(min_rows=DERIVATIVE_BLOCK_ROWS)
def smooth_rotation_family_variance_kernel(record, first_param, absorption_coefficients,
                                           absorption_first, fixed_factor, parameters,
                                           free_col_of_full, covariance, g, var_g):
    """g and var(g) of every row: smooth_rotation_family_kernel's derivatives of each row,
    written into a scratch row rather than a table of all rows, then variance_of_g_row of
    them (the same values as the two kernels in turn; issue 10: the final expansion wrote
    and read back ~360 B of derivative table per row)."""
    n = record.shape[0]
    n_slots = SMOOTH_SLOTS
    if absorption_coefficients is not None:
        n_slots += absorption_coefficients.shape[1]
    n_chunks = (n + VARIANCE_CHUNK_ROWS - 1) // VARIANCE_CHUNK_ROWS
    for c in prange(n_chunks):
        values = np.empty((1, n_slots))
        cols = np.empty((1, n_slots), dtype=np.int32)
        for i in range(c * VARIANCE_CHUNK_ROWS, min(n, (c + 1) * VARIANCE_CHUNK_ROWS)):
            g[i] = _row_g_and_derivatives(i, record, first_param, absorption_coefficients,
                                          absorption_first, fixed_factor, parameters,
                                          free_col_of_full, values, cols, 0)
            var_g[i] = variance_of_g_row(values, cols, 0, covariance)


@parallel_when_large
def smooth_rotation_family_g_kernel(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters, g):
    n = record.shape[0]
    for i in prange(n):
        s, e, a, f = _row_factors(i, record, first_param, absorption_coefficients,
                                  absorption_first, fixed_factor, parameters)
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


def evaluate_smooth_rotation_family_variance(record, first_param, absorption_coefficients,
                                             absorption_first, fixed_factor, parameters,
                                             free_col_of_full, covariance):
    """(g (n,), var(g) (n,)) of every row at once, no derivative table (covariance over
    the free columns)."""
    n = record.shape[0]
    g = np.empty(n)
    var_g = np.empty(n)
    smooth_rotation_family_variance_kernel(record, first_param, absorption_coefficients,
                                           absorption_first, fixed_factor, parameters,
                                           free_col_of_full,
                                           np.ascontiguousarray(covariance, dtype=np.float64),
                                           g, var_g)
    return g, var_g


def evaluate_smooth_rotation_family_g(record, first_param, absorption_coefficients,
                                      absorption_first, fixed_factor, parameters):
    g = np.empty(record.shape[0])
    smooth_rotation_family_g_kernel(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters, g)
    return g


# -- g alone, from the smoothers' coordinates (no weight table) --------------------------
NO_EXPONENT, SMOOTH_B, DOSE_AND_B = 0, 1, 2  # per dataset: the model's exponent terms


@njit(cache=True)
def _smoothed_1d(z, n_values, parameters, first):
    """The 1D Gaussian smoother's value at coordinate z: model/smoother.py's weights (2 or
    3 neighbours), normalised, then summed with the parameters in slot order."""
    n_average = min(MAX_AVERAGE, n_values)
    sigma = sigma_of(n_average)
    i1, i2 = index_range(z, n_values, n_average)
    ds = (z - position(i1, n_values)) / sigma
    w0 = math.exp(-ds * ds)
    ds = (z - position(i1 + 1, n_values)) / sigma
    w1 = math.exp(-ds * ds)
    w2 = 0.0
    total = w0 + w1
    if i2 - i1 > 2:
        ds = (z - position(i1 + 2, n_values)) / sigma
        w2 = math.exp(-ds * ds)
        total += w2
    if total > 0.0:
        w0 /= total
        w1 /= total
        w2 /= total
    value = w0 * parameters[first + i1] + w1 * parameters[first + i1 + 1]
    if i2 - i1 > 2:
        value += w2 * parameters[first + i1 + 2]
    return value


@parallel_when_large
def smooth_rotation_g_kernel(row_dataset, scale_z, exponent_inputs, absorption_value,
                             fixed_factor, scale_n, scale_first, exponent_kind, exponent_n,
                             exponent_first, parameters, g):
    """g = S exp-terms A F in the models' component order, S and a smooth B computed from
    each row's smoother coordinates. Per row: scale_z, exponent_inputs (n, 2) (smooth B:
    its coordinate and 1/(2 d^2); dose_decay: z/d^n and 1/(2 d^2)), absorption_value and
    fixed_factor (None when no dataset has them). Per dataset: scale_n (0: no scale term),
    scale_first, exponent_kind, exponent_n, exponent_first (d, 2) (dose_decay: C and B_rel,
    -1 when absent)."""
    n = row_dataset.shape[0]
    for r in prange(n):
        d = row_dataset[r]
        value = 1.0
        if scale_n[d] > 0:
            value = _smoothed_1d(scale_z[r], scale_n[d], parameters, scale_first[d])
        kind = exponent_kind[d]
        if kind == SMOOTH_B:
            b = _smoothed_1d(exponent_inputs[r, 0], exponent_n[d], parameters,
                             exponent_first[d, 0])
            value *= math.exp(b * exponent_inputs[r, 1])
        elif kind == DOSE_AND_B:
            if exponent_first[d, 0] >= 0:
                value *= math.exp(parameters[exponent_first[d, 0]] * exponent_inputs[r, 0])
            if exponent_first[d, 1] >= 0:
                value *= math.exp(parameters[exponent_first[d, 1]] * exponent_inputs[r, 1])
        if absorption_value is not None:
            value *= absorption_value[r]
        if fixed_factor is not None:
            value *= fixed_factor[r]
        g[r] = value
