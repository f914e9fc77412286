"""Outlier rejection on the device: twins of dials_vmerge.scaling.outliers' kernels.

One thread per group (groups are independent, so there is no reduction and the mask is the
CPU kernel's bit for bit): the weights capped at 10x the group's median weight, then the
standard test (iterative leave-one-out normalised deviations, the largest z > zmax rejected
until none is left, groups of more than two observations) or the simple test (one pass, the
observation included in the mean). The median sorts the group's weights in a scratch array
of one slot per observation (the group's own slots), so group sizes are not bounded.
The outlier mask is uint8 (1: outlier).
"""

from __future__ import annotations

import math

from numba import cuda

from .launch import THREADS_PER_BLOCK  # noqa: E402
from .launch import blocks as launch_blocks  # noqa: E402
from .launch import group_weighted_sums
WEIGHT_CAP_FACTOR = 10.0  # as scaling.outliers (the kernel layer does not import scaling)
ZERO_DENOMINATOR_Z = 1000.0


def blocks(n):
    return launch_blocks(n)


@cuda.jit(device=True)
def _capped_weights_kernel_one(weight, group_start, scratch, out, grp):
    lo = group_start[grp]
    hi = group_start[grp + 1]
    n = hi - lo
    if n == 0:
        return
    for j in range(n):  # insertion sort into the group's scratch slots
        v = weight[lo + j]
        k = j
        while k > 0 and scratch[lo + k - 1] > v:
            scratch[lo + k] = scratch[lo + k - 1]
            k -= 1
        scratch[lo + k] = v
    if n % 2 == 1:
        median = scratch[lo + n // 2]
    else:
        median = (scratch[lo + n // 2 - 1] + scratch[lo + n // 2]) / 2.0
    cap = WEIGHT_CAP_FACTOR * median
    for i in range(lo, hi):
        out[i] = min(weight[i], cap)


@cuda.jit
def capped_weights_kernel(weight, group_start, scratch, out):
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        _capped_weights_kernel_one(weight, group_start, scratch, out, grp)


@cuda.jit(device=True)
def _standard_outlier_kernel_one(intensity, weight, g, group_start, zmax, outlier, grp):
    lo = group_start[grp]
    hi = group_start[grp + 1]
    while True:
        n_active = 0
        s_wgi = 0.0
        s_wgg = 0.0
        for i in range(lo, hi):
            if outlier[i] == 0:
                n_active += 1
                wg = weight[i] * g[i]
                s_wgi += wg * intensity[i]
                s_wgg += wg * g[i]
        if n_active <= 2:
            break
        z_max_found = -1.0
        worst = -1
        for i in range(lo, hi):
            if outlier[i] != 0:
                continue
            wg = weight[i] * g[i]
            others_wgg = s_wgg - wg * g[i]
            if others_wgg == 0.0:
                z = ZERO_DENOMINATOR_Z
            else:
                ih_others = (s_wgi - wg * intensity[i]) / others_wgg
                z = abs(intensity[i] - g[i] * ih_others) / math.sqrt(
                    1.0 / weight[i] + g[i] * g[i] / others_wgg)
            if z > z_max_found:
                z_max_found = z
                worst = i
        if z_max_found > zmax:
            outlier[worst] = 1
        else:
            break


@cuda.jit
def standard_outlier_kernel(intensity, weight, g, group_start, zmax, outlier):
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        _standard_outlier_kernel_one(intensity, weight, g, group_start, zmax, outlier, grp)


@cuda.jit(device=True)
def _simple_outlier_kernel_one(intensity, weight, g, group_start, zmax, outlier, grp):
    lo = group_start[grp]
    hi = group_start[grp + 1]
    s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
    if s_wgg <= 0.0:
        return
    ih = s_wgi / s_wgg
    for i in range(lo, hi):
        term = g[i] / s_wgg  # DIALS squares g / sum(w g^2), as the CPU kernel
        z = abs(intensity[i] - g[i] * ih) / math.sqrt(1.0 / weight[i] + term * term)
        if z > zmax:
            outlier[i] = 1


@cuda.jit
def simple_outlier_kernel(intensity, weight, g, group_start, zmax, outlier):
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        _simple_outlier_kernel_one(intensity, weight, g, group_start, zmax, outlier, grp)


def outlier_mask(intensity, weight, g, group_start, method="standard", zmax=6.0):
    """The outlier mask (numpy bool) of one z-test on the device; inputs in group order."""
    import numpy as np

    n = int(np.asarray(intensity).size)
    if n == 0:
        return np.zeros(0, dtype=bool)

    def put(values, dtype=np.float64):
        return cuda.to_device(np.ascontiguousarray(values, dtype=dtype))

    return resident_outlier_mask(put(intensity), put(weight), put(g),
                                 put(group_start, np.int64), method, zmax)


def resident_outlier_mask(intensity, weight, g, group_start, method="standard", zmax=6.0):
    """outlier_mask of device arrays (the job's resident table, backends.cuda_job_table):
    nothing goes up, the mask comes down."""
    import numpy as np

    n = int(intensity.shape[0])
    n_groups = int(group_start.shape[0]) - 1
    if n == 0:
        return np.zeros(0, dtype=bool)
    capped = cuda.device_array(n)
    capped_weights_kernel[blocks(n_groups), THREADS_PER_BLOCK](
        weight, group_start, cuda.device_array(n), capped)
    mask = cuda.device_array(n, dtype=np.uint8)
    zero_mask_kernel[blocks(n), THREADS_PER_BLOCK](mask)
    kernel = simple_outlier_kernel if method == "simple" else standard_outlier_kernel
    kernel[blocks(n_groups), THREADS_PER_BLOCK](intensity, capped, g, group_start,
                                                float(zmax), mask)
    return mask.copy_to_host().astype(bool)


@cuda.jit
def zero_mask_kernel(mask):
    for i in range(cuda.grid(1), mask.shape[0], cuda.gridsize(1)):
        mask[i] = 0
