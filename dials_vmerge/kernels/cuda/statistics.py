"""The half-dataset sums of the merging statistics (CC1/2, CCanom) on the device.

Twins of merging.statistics.half_split_kernel and of its pearson: one thread per group draws
the group's random first half (cctbx's partial Fisher-Yates, _draw_first_half) and sums both
halves in row order, as the CPU kernel does (the same operations: bitwise in practice); the
correlation of the two halves over a shell is one block's fixed-order tree (count, sums, then
centred sums about the means), so only six numbers per shell cross the bus.

The random stream is consumed group after group on the CPU; which draw each group starts at
depends on the group sizes and, for odd sizes, on one draw. split_draws makes that scan on the
host (per group, no observation read), so the device threads start at their own draw.

Observations are read in the caller's row order through the grouping's permutation (the job
table's resident copies); each group shuffles its rows in its own slice [start, end) of a
scratch copy of the permutation, so groups never share memory.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, njit

from .launch import THREADS_PER_BLOCK, blocks

# counts, sum x, sum y; then sum dx^2, sum dy^2, sum dx dy
_SUMS = 3


@njit(cache=True)
def split_draws(group_start, groups_in_order, uniforms):
    """(first draw, size of the first half) of each group in order, the draws
    merging.statistics._draw_first_half takes (first half 0 for n < 2)."""
    n_sel = groups_in_order.shape[0]
    first_draw = np.zeros(n_sel, np.int64)
    n_first_half = np.zeros(n_sel, np.int64)
    u = 0
    for k in range(n_sel):
        g = groups_in_order[k]
        n = group_start[g + 1] - group_start[g]
        if n < 2:
            continue
        n_first = n // 2
        if u + n_first + 2 * (n - 2 * n_first) > uniforms.shape[0]:
            raise ValueError("half split: too few random numbers")
        first_draw[k] = u
        if 2 * n_first != n:
            if uniforms[u] < 0.5:
                n_first += 1
            u += 1
        u += n_first
        n_first_half[k] = n_first
    return first_draw, n_first_half


@cuda.jit
def half_split_means_kernel(intensity, sigma, permutation, group_start, groups_in_order,
                            first_draw, n_first_half, uniforms, weighted, scratch, half_1,
                            half_2):
    start_k = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(start_k, groups_in_order.shape[0], stride):
        g = groups_in_order[k]
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            half_1[k] = math.nan
            half_2[k] = math.nan
            continue
        for i in range(n):
            scratch[start + i] = permutation[start + i]
        u = first_draw[k]
        if n % 2 == 1:
            u += 1  # the draw that chose the odd member's half
        n_first = n_first_half[k]
        for i in range(n_first):
            pick = i + min(n - i - 1, int(uniforms[u] * (n - i)))
            u += 1
            picked = scratch[start + pick]
            scratch[start + pick] = scratch[start + i]
            scratch[start + i] = picked
        sum_1 = 0.0
        weight_1 = 0.0
        sum_2 = 0.0
        weight_2 = 0.0
        for i in range(n):
            row = scratch[start + i]
            w = 1.0 / (sigma[row] * sigma[row]) if weighted else 1.0
            if i < n_first:
                sum_1 += intensity[row] * w
                weight_1 += w
            else:
                sum_2 += intensity[row] * w
                weight_2 += w
        half_1[k] = sum_1 / weight_1
        half_2[k] = sum_2 / weight_2


@cuda.jit
def pair_differences_kernel(values, first, second, out):
    """out[j] = values[first[j]] - values[second[j]] (NaN when either is NaN)."""
    j0 = cuda.grid(1)
    for j in range(j0, first.shape[0], cuda.gridsize(1)):
        out[j] = values[first[j]] - values[second[j]]


@cuda.jit(device=True)
def _block_tree_sum(buf, t, n_sums, out):
    """out[:n_sums] = the sum over the block's threads of buf[thread, :n_sums], as a pairwise
    tree in a fixed order (no atomics: the same bits on every launch)."""
    cuda.syncthreads()
    half = THREADS_PER_BLOCK // 2
    while half > 0:
        if t < half:
            for s in range(n_sums):
                buf[t, s] += buf[t + half, s]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        for s in range(n_sums):
            out[s] = buf[0, s]


@cuda.jit
def pearson_sums_kernel(x, y, means, out):
    """One block: with means[2] == 0 the count and sums of x and y over the
    pairs with x not NaN; else the centred sums about means[0], means[1]. Each thread sums a
    fixed stride, then a shared-memory tree: the order is fixed by the launch."""
    buf = cuda.shared.array((THREADS_PER_BLOCK, _SUMS), dtype=np.float64)
    t = cuda.threadIdx.x
    centred = means[2] != 0.0
    a = 0.0
    b = 0.0
    c = 0.0
    for i in range(t, x.shape[0], THREADS_PER_BLOCK):
        xi = x[i]
        if math.isnan(xi):
            continue
        if centred:
            dx = xi - means[0]
            dy = y[i] - means[1]
            a += dx * dx
            b += dy * dy
            c += dx * dy
        else:
            a += 1.0
            b += xi
            c += y[i]
    buf[t, 0] = a
    buf[t, 1] = b
    buf[t, 2] = c
    _block_tree_sum(buf, t, _SUMS, out)


def half_split_means(intensity, sigma, permutation, group_start, groups_in_order, first_draw,
                     n_first_half, uniforms, weighted, put=cuda.to_device):
    """Device arrays (half_1, half_2) of the groups in order (NaN for n < 2). intensity,
    sigma, permutation, group_start and uniforms: device arrays; the per-group draw table is
    copied with put (counted by the caller)."""
    n_sel = int(groups_in_order.shape[0])
    half_1 = cuda.device_array(max(n_sel, 1))
    half_2 = cuda.device_array(max(n_sel, 1))
    if n_sel:
        scratch = cuda.device_array(max(int(permutation.shape[0]), 1), dtype=np.int64)
        half_split_means_kernel[blocks(n_sel), THREADS_PER_BLOCK](
            intensity, sigma, permutation, group_start, put(groups_in_order),
            put(first_draw), put(n_first_half), uniforms, bool(weighted), scratch, half_1,
            half_2)
    return half_1[:n_sel], half_2[:n_sel]


def pair_differences(values, first, second, put=cuda.to_device):
    n = int(first.shape[0])
    out = cuda.device_array(max(n, 1))
    if n:
        pair_differences_kernel[blocks(n), THREADS_PER_BLOCK](values, put(first), put(second),
                                                              out)
    return out[:n]


def pearson(x, y, put=cuda.to_device):
    """(Pearson correlation, number of pairs) of the device arrays x and y over the pairs with
    x not NaN; 0 when undefined (fewer than 2 pairs or no spread), as
    merging.statistics.pearson. Two one-block passes; six numbers come back."""
    if int(x.shape[0]) == 0:
        return 0.0, 0
    sums = cuda.device_array(_SUMS)
    pearson_sums_kernel[1, THREADS_PER_BLOCK](x, y, put(np.zeros(3)), sums)
    count, sum_x, sum_y = sums.copy_to_host()
    n = int(count)
    if n < 2:
        return 0.0, n
    means = np.array([sum_x / count, sum_y / count, 1.0])
    pearson_sums_kernel[1, THREADS_PER_BLOCK](x, y, put(means), sums)
    sxx, syy, sxy = sums.copy_to_host()
    denominator = math.sqrt(sxx * syy)
    if denominator == 0:
        return 0.0, n
    return float(sxy) / denominator, n


_R_SUMS = 4


@cuda.jit
def rmerge_sums_kernel(abs_dev, total, group_start, groups, out):
    """One block: over the listed groups with n > 1, sum |I - <I>|, sum sqrt(n/(n-1)) |I -
    <I>|, sum sqrt(1/(n-1)) |I - <I>| and sum I (Rmerge, Rmeas, Rpim and their
    denominator), each thread a fixed stride, then a shared-memory tree."""
    buf = cuda.shared.array((THREADS_PER_BLOCK, _R_SUMS), dtype=np.float64)
    t = cuda.threadIdx.x
    r_merge = 0.0
    r_meas = 0.0
    r_pim = 0.0
    denominator = 0.0
    for k in range(t, groups.shape[0], THREADS_PER_BLOCK):
        g = groups[k]
        n = float(group_start[g + 1] - group_start[g])
        if n > 1.0:
            r_merge += abs_dev[g]
            r_meas += math.sqrt(n / (n - 1.0)) * abs_dev[g]
            r_pim += math.sqrt(1.0 / (n - 1.0)) * abs_dev[g]
            denominator += total[g]
    buf[t, 0] = r_merge
    buf[t, 1] = r_meas
    buf[t, 2] = r_pim
    buf[t, 3] = denominator
    _block_tree_sum(buf, t, _R_SUMS, out)


def rmerge_sums(abs_dev, total, group_start, groups, put=cuda.to_device):
    """(sum |I - <I>|, Rmeas numerator, Rpim numerator, sum I) over the groups listed (device
    per-group arrays; groups a host array of group numbers): four numbers come back."""
    out = cuda.device_array(_R_SUMS)
    if int(groups.shape[0]) == 0:
        return 0.0, 0.0, 0.0, 0.0
    rmerge_sums_kernel[1, THREADS_PER_BLOCK](abs_dev, total, group_start,
                                             put(np.ascontiguousarray(groups, np.int64)),
                                             out)
    return tuple(float(v) for v in out.copy_to_host())
