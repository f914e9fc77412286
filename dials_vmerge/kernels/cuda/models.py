"""Model evaluation on the device: g and dg/dp (ELL form) of every observation in one launch.

Twins of dials_vmerge.kernels.kb_family (KB family over all datasets) and of the model part
of dials_vmerge.scaling.physical_pass (smoothed scale x exp(smoothed B) x spherical-harmonic
absorption x fixed factor). Also var(g) = d^T C d per observation (twin of
scaling.target.variance_of_g_kernel).

Physical ELL layout (per observation, columns in the "full" parameter vector of
physical_pass, guard included): slots 0-2 the three scale parameters p0..p0+2, slots 3-5 the
three decay parameters q0..q0+2, then one slot per absorption coefficient a0+k. Derivatives:
dg/dS_j = ws_j e a f, dg/dB_j = wd_j g, dg/dC_k = c_k s e f.

Optional inputs (fixed factor, absorption) are passed as 1-element placeholders with a flag,
since a CUDA kernel has no None arguments.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK  # noqa: E402
from .launch import blocks as launch_blocks  # noqa: E402


def blocks(n_threads):
    return launch_blocks(n_threads)


@cuda.jit
def kb_family_kernel(row_dataset, inv_two_d_sq, fixed_factor, has_fixed, scale_value,
                     decay_value, g, deriv_values):
    """g = K exp(B / 2d^2) f; slot 0 dg/dK, slot 1 dg/dB (columns fixed: kb_family_columns)."""
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        d = row_dataset[i]
        k = scale_value[d]
        e = math.exp(decay_value[d] * inv_two_d_sq[i])
        f = 1.0
        if has_fixed:
            f = fixed_factor[i]
        g[i] = k * e * f
        deriv_values[i, 0] = e * f
        deriv_values[i, 1] = e * inv_two_d_sq[i] * k * f


@cuda.jit
def kb_family_g_kernel(row_dataset, inv_two_d_sq, fixed_factor, has_fixed, scale_value,
                       decay_value, g):
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        d = row_dataset[i]
        f = 1.0
        if has_fixed:
            f = fixed_factor[i]
        g[i] = scale_value[d] * math.exp(decay_value[d] * inv_two_d_sq[i]) * f


def kb_family_columns(row_dataset, scale_col, decay_col):
    """ELL columns of the KB family (n, 2) int32: they depend on the dataset only."""
    row_dataset = np.asarray(row_dataset, dtype=np.int64)
    cols = np.empty((row_dataset.size, 2), dtype=np.int32)
    cols[:, 0] = np.asarray(scale_col)[row_dataset]
    cols[:, 1] = np.asarray(decay_col)[row_dataset]
    return cols


@cuda.jit(device=True)
def _physical_parts(record, first_param, absorption_coefficients, absorption_first, has_abs,
                    fixed_factor, has_fixed, parameters, i):
    p0 = first_param[i, 0]
    q0 = first_param[i, 1]
    s = (record[i, 2] * parameters[p0] + record[i, 3] * parameters[p0 + 1]
         + record[i, 4] * parameters[p0 + 2])
    e = math.exp(record[i, 5] * parameters[q0] + record[i, 6] * parameters[q0 + 1]
                 + record[i, 7] * parameters[q0 + 2])
    a = 1.0
    if has_abs:
        a0 = absorption_first[i]
        for k in range(absorption_coefficients.shape[1]):
            a += absorption_coefficients[i, k] * parameters[a0 + k]
    f = 1.0
    if has_fixed:
        f = fixed_factor[i]
    return s, e, a, f


@cuda.jit
def physical_model_kernel(record, first_param, absorption_coefficients, absorption_first,
                          has_abs, fixed_factor, has_fixed, parameters, g, deriv_values):
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        s, e, a, f = _physical_parts(record, first_param, absorption_coefficients,
                                     absorption_first, has_abs, fixed_factor, has_fixed,
                                     parameters, i)
        gi = s * e * a * f
        g[i] = gi
        scale_other = e * a * f
        for j in range(3):
            deriv_values[i, j] = scale_other * record[i, 2 + j]
            deriv_values[i, 3 + j] = gi * record[i, 5 + j]
        if has_abs:
            absorption_other = s * e * f
            for k in range(absorption_coefficients.shape[1]):
                deriv_values[i, 6 + k] = absorption_other * absorption_coefficients[i, k]


@cuda.jit
def physical_g_kernel(record, first_param, absorption_coefficients, absorption_first, has_abs,
                      fixed_factor, has_fixed, parameters, g):
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        s, e, a, f = _physical_parts(record, first_param, absorption_coefficients,
                                     absorption_first, has_abs, fixed_factor, has_fixed,
                                     parameters, i)
        g[i] = s * e * a * f


def physical_columns(first_param, absorption_first, n_absorption):
    """ELL columns (n, 6 + n_absorption) of the physical layout, in the full vector."""
    first_param = np.asarray(first_param, dtype=np.int64)
    n = first_param.shape[0]
    cols = np.empty((n, 6 + n_absorption), dtype=np.int64)
    for j in range(3):
        cols[:, j] = first_param[:, 0] + j
        cols[:, 3 + j] = first_param[:, 1] + j
    for k in range(n_absorption):
        cols[:, 6 + k] = np.asarray(absorption_first, dtype=np.int64) + k
    return cols


@cuda.jit
def variance_of_g_kernel(deriv_values, deriv_col, covariance, out):
    """var(g_i) = sum_kk' dg_i/dp_k cov[k, k'] dg_i/dp_k' over the used slots."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        n_slots = deriv_values.shape[1]
        total = 0.0
        for k in range(n_slots):
            ck = deriv_col[i, k]
            if ck < 0:
                continue
            dk = deriv_values[i, k]
            for kk in range(n_slots):
                ckk = deriv_col[i, kk]
                if ckk >= 0:
                    total += dk * covariance[ck, ckk] * deriv_values[i, kk]
        out[i] = total


def placeholder(array, dtype=np.float64, ndim=1):
    """(device array, flag): the array on the device, or a 1-element stand-in and False."""
    if array is None:
        return cuda.to_device(np.zeros((1,) * ndim, dtype=dtype)), False
    return cuda.to_device(np.ascontiguousarray(array, dtype=dtype)), True
