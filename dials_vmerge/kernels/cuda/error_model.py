"""The error-model sums on the device: twins of kernels.error_model_ml.a_sq_and_cost_kernel
(the profile likelihood of b, scaling.error_model.refine_maximum_likelihood) and of
scaling.error_model._binned_deviation_sums (the DIALS b functional's per-bin sums).

The refinement data (I, sigma^2, g, weight shares, squared residuals, bins) go to the device
once per refinement (DeviceErrorModelSums) and stay there for every evaluation of the
bracket and Brent search of b; each evaluation brings back a few block partials.

Reductions in a fixed order, no floating-point atomics:
- the likelihood: one thread per group (observations sorted by group) adds the group's
  spread sum p^2 q in row order, as the CPU kernel does, then the group's ratios r^2 / unit;
  per-block sums over a fixed shared-memory tree, the blocks added exactly on the host
  (math.fsum); a second launch adds log(a^2 unit) the same way;
- the binned sums: each thread keeps per-bin partials of its grid-stride share of the
  observations; the host adds the threads' rows in thread order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from .launch import MAX_BLOCKS, THREADS_PER_BLOCK
from .launch import blocks as launch_blocks

# Per-thread bin partials live in local memory: at most this many bins (the default is 10).
MAX_BINS = 64
# Threads (rows of bin partials) of the binned sums on a GPU: enough to fill the device,
# few enough that the partials stay a few MB.
BINNED_SUM_BLOCKS = 1024


@cuda.jit(device=True)
def _block_tree_sum(shared, tid, value, out):
    """out[blockIdx] = sum of value over the block's threads, by a fixed binary tree."""
    shared[tid] = value
    cuda.syncthreads()
    step = THREADS_PER_BLOCK // 2
    while step > 0:
        if tid < step:
            shared[tid] += shared[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        out[cuda.blockIdx.x] = shared[0]


@cuda.jit
def unit_and_ratio_kernel(intensity, variance, g, share, residual_sq, group_start, b, unit,
                          ratio_block):
    """Thread per group: unit variance of every observation (into unit) and the block's sum
    of r^2 / unit."""
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    ratio = 0.0
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        lo = group_start[grp]
        hi = group_start[grp + 1]
        spread = 0.0
        for i in range(lo, hi):
            bi = b * intensity[i]
            q = (variance[i] + bi * bi) / (g[i] * g[i])
            spread += share[i] * share[i] * q
        for i in range(lo, hi):
            bi = b * intensity[i]
            q = (variance[i] + bi * bi) / (g[i] * g[i])
            u = q * (1.0 - 2.0 * share[i]) + spread
            if not u >= 1e-300:  # as np.maximum: NaN stays NaN
                if u == u:
                    u = 1e-300
            unit[i] = u
            ratio += residual_sq[i] / u
    _block_tree_sum(shared, cuda.threadIdx.x, ratio, ratio_block)


@cuda.jit
def log_sum_kernel(unit, a_sq, log_block):
    """Per block: sum of log(a^2 unit) over its grid-stride share of the observations."""
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    total = 0.0
    for i in range(cuda.grid(1), unit.shape[0], cuda.gridsize(1)):
        total += math.log(a_sq * unit[i])
    _block_tree_sum(shared, cuda.threadIdx.x, total, log_block)


@cuda.jit
def unit_slope_and_ratio_kernel(intensity, variance, g, share, residual_sq, group_start, b,
                                unit, unit_slope, ratio_block):
    """Thread per group: u and du/db of every observation and the block's sum of r^2 / u
    (twin of the first passes of kernels.error_model_ml.cost_slope_kernel)."""
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    ratio = 0.0
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        lo = group_start[grp]
        hi = group_start[grp + 1]
        spread = 0.0
        spread_slope = 0.0
        for i in range(lo, hi):
            bi = b * intensity[i]
            g_sq = g[i] * g[i]
            p_sq = share[i] * share[i]
            spread += p_sq * ((variance[i] + bi * bi) / g_sq)
            spread_slope += p_sq * (2.0 * b * intensity[i] * intensity[i] / g_sq)
        for i in range(lo, hi):
            bi = b * intensity[i]
            g_sq = g[i] * g[i]
            q = (variance[i] + bi * bi) / g_sq
            dq = 2.0 * b * intensity[i] * intensity[i] / g_sq
            u = q * (1.0 - 2.0 * share[i]) + spread
            du = dq * (1.0 - 2.0 * share[i]) + spread_slope
            if not u >= 1e-300:
                if u == u:
                    u = 1e-300
                du = 0.0
            unit[i] = u
            unit_slope[i] = du
            ratio += residual_sq[i] / u
    _block_tree_sum(shared, cuda.threadIdx.x, ratio, ratio_block)


@cuda.jit
def slope_sums_kernel(unit, unit_slope, residual_sq, log_slope_block, ratio_slope_block):
    """Per block: sum u'/u and sum r^2 u'/u^2 over its grid-stride observations."""
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    log_slope = 0.0
    ratio_slope = 0.0
    for i in range(cuda.grid(1), unit.shape[0], cuda.gridsize(1)):
        log_slope += unit_slope[i] / unit[i]
        ratio_slope += residual_sq[i] * unit_slope[i] / unit[i] / unit[i]
    _block_tree_sum(shared, cuda.threadIdx.x, log_slope, log_slope_block)
    cuda.syncthreads()
    _block_tree_sum(shared, cuda.threadIdx.x, ratio_slope, ratio_slope_block)


@cuda.jit
def binned_deviation_sums_kernel(intensity, variance, g, ih, prefactor, bin_index, a, b,
                                 s1_partial, s2_partial):
    """Per thread and bin: sum delta and sum delta^2 over the thread's observations."""
    n_bins = s1_partial.shape[1]
    s1 = cuda.local.array(MAX_BINS, float64)
    s2 = cuda.local.array(MAX_BINS, float64)
    for k in range(n_bins):
        s1[k] = 0.0
        s2[k] = 0.0
    t = cuda.grid(1)
    for i in range(t, intensity.shape[0], cuda.gridsize(1)):
        k = bin_index[i]
        if k < 0:
            continue
        bi = b * intensity[i]
        sigma_prime = a * math.sqrt(variance[i] + bi * bi) / g[i]
        d = prefactor[i] * (intensity[i] / g[i] - ih[i]) / sigma_prime
        s1[k] += d
        s2[k] += d * d
    for k in range(n_bins):
        s1_partial[t, k] = s1[k]
        s2_partial[t, k] = s2[k]


def _ordered_rows_sum(partials):
    total = np.zeros(partials.shape[1])
    for row in partials:  # thread order
        total += row
    return total


class DeviceErrorModelSums:
    """One error-model refinement's observations on the device (sorted by group)."""

    def __init__(self, intensity, variance, g, share=None, residual_sq=None, group=None,
                 ih=None, prefactor=None, bin_index=None, n_bins=0, upload=None):
        """upload(name, host array): its device copy (default cuda.to_device; a run passes
        its job table's, which reuses a resident copy of the same content)."""
        def put(name, values, dtype=np.float64):
            values = np.ascontiguousarray(values, dtype=dtype)
            if upload is not None:
                return upload(name, values)
            return cuda.to_device(values)

        self.n = int(np.asarray(intensity).size)
        self._intensity = put("intensity", intensity)
        self._variance = put("variance", variance)
        self._g = put("g", g)
        if group is not None:
            group = np.asarray(group, dtype=np.int64)
            if group.size and np.any(np.diff(group) < 0):
                raise ValueError("the device error-model sums need observations sorted by "
                                 "group")
            n_groups = int(group[-1]) + 1 if group.size else 0
            group_start = np.searchsorted(group, np.arange(n_groups + 1)).astype(np.int64)
            self.n_groups = n_groups
            self._share = put("share", share)
            self._residual_sq = put("residual_sq", residual_sq)
            self._group_start = put("group_start", group_start, np.int64)
            self._unit = cuda.device_array(max(self.n, 1))
            self._group_blocks = launch_blocks(n_groups)
            self._ratio_block = cuda.device_array(self._group_blocks)
            self._obs_blocks = launch_blocks(self.n)
            self._log_block = cuda.device_array(self._obs_blocks)
            self._unit_slope = None
        if bin_index is not None:
            if n_bins > MAX_BINS:
                raise ValueError(f"the device error-model sums take at most {MAX_BINS} bins")
            self.n_bins = int(n_bins)
            self._ih = put("ih", ih)
            self._prefactor = put("prefactor", prefactor)
            self._bin_index = put("bin_index", bin_index, np.int64)
            self._bin_blocks = min(launch_blocks(self.n), BINNED_SUM_BLOCKS, MAX_BLOCKS)
            rows = self._bin_blocks * THREADS_PER_BLOCK
            self._s1 = cuda.device_array((rows, max(self.n_bins, 1)))
            self._s2 = cuda.device_array((rows, max(self.n_bins, 1)))

    def a_sq_and_cost(self, b, fixed_a_sq):
        """(a^2, cost) at b, as kernels.error_model_ml.a_sq_and_cost_kernel."""
        n = self.n
        if n == 0:
            return (fixed_a_sq if fixed_a_sq >= 0 else math.nan), 0.0
        unit_and_ratio_kernel[self._group_blocks, THREADS_PER_BLOCK](
            self._intensity, self._variance, self._g, self._share, self._residual_sq,
            self._group_start, float(b), self._unit[:n], self._ratio_block)
        sum_ratio = math.fsum(self._ratio_block.copy_to_host().tolist())
        a_sq = float(fixed_a_sq)
        if a_sq < 0.0:
            a_sq = sum_ratio / n
        log_sum_kernel[self._obs_blocks, THREADS_PER_BLOCK](self._unit[:n], a_sq,
                                                             self._log_block)
        sum_log = math.fsum(self._log_block.copy_to_host().tolist())
        return a_sq, sum_log + sum_ratio / a_sq

    def cost_slope(self, b, fixed_a_sq):
        """d cost / d b at b, as kernels.error_model_ml.cost_slope_kernel."""
        n = self.n
        if n == 0:
            return 0.0
        if self._unit_slope is None:
            self._unit_slope = cuda.device_array(n)
            self._slope_blocks = (cuda.device_array(self._obs_blocks),
                                  cuda.device_array(self._obs_blocks))
        unit_slope_and_ratio_kernel[self._group_blocks, THREADS_PER_BLOCK](
            self._intensity, self._variance, self._g, self._share, self._residual_sq,
            self._group_start, float(b), self._unit[:n], self._unit_slope,
            self._ratio_block)
        sum_ratio = math.fsum(self._ratio_block.copy_to_host().tolist())
        a_sq = float(fixed_a_sq)
        if a_sq < 0.0:
            a_sq = sum_ratio / n
        slope_sums_kernel[self._obs_blocks, THREADS_PER_BLOCK](
            self._unit[:n], self._unit_slope, self._residual_sq, *self._slope_blocks)
        log_slope = math.fsum(self._slope_blocks[0].copy_to_host().tolist())
        ratio_slope = math.fsum(self._slope_blocks[1].copy_to_host().tolist())
        return log_slope - ratio_slope / a_sq

    def binned_deviation_sums(self, a, b):
        """Per bin (sum delta, sum delta^2), as error_model._binned_deviation_sums."""
        binned_deviation_sums_kernel[self._bin_blocks, THREADS_PER_BLOCK](
            self._intensity, self._variance, self._g, self._ih, self._prefactor,
            self._bin_index, float(a), float(b), self._s1, self._s2)
        s1 = _ordered_rows_sum(self._s1.copy_to_host())[:self.n_bins]
        s2 = _ordered_rows_sum(self._s2.copy_to_host())[:self.n_bins]
        return s1, s2
