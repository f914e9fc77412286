"""numba.cuda twins of the scaling target/gradient and of the merged-mean kernels.

Same data layout and formulas as dials_vmerge.scaling.target / ih_table (observations sorted
by group, `group_start` offsets, dg/dp in ELL form with -1 for an unused slot):

    Ih = sum(w g I) / sum(w g^2),  r = I - g Ih,  Phi = sum w r^2,
    dPhi/dp_c = sum over slots with deriv_index == c of -2 w r Ih dg/dp.

Two launches per evaluation, both free of floating-point atomics so the result is bitwise
reproducible for a given problem and block size:
1. one thread per group: Ih, Phi of the group, and the per-observation gradient factor
   -2 w r Ih; the block's Phi is reduced in shared memory over a fixed binary tree.
2. one thread per (observation segment, parameter column): the column's ELL entries, stored
   once in (column, observation) order, are summed serially within the segment.
The host then adds the per-block Phi (exactly, math.fsum) and the per-segment gradient rows in
segment order. Segments exist so a model with few parameters still fills the device.

numba.cuda is imported with this module: set NUMBA_ENABLE_CUDASIM=1 before importing it to
run on the CPU simulator (tests do so in a subprocess).
"""

from __future__ import annotations

import math

import dials_vmerge  # noqa: F401  (cctbx before numba: import-order crash otherwise)
import numpy as np
from numba import cuda, float64, njit

# Power of two: the shared-memory tree reduction halves the active threads each step
# (kernels/cuda/launch.py: 32 under the simulator).
from dials_vmerge.kernels.cuda.launch import THREADS_PER_BLOCK  # noqa: E402
from dials_vmerge.kernels.cuda.launch import blocks as launch_blocks  # noqa: E402
from dials_vmerge.kernels.cuda.launch import group_weighted_sums
# Enough (segment, column) threads to occupy a GPU; segments shorter than this many
# observations would cost more in partial rows than they gain in parallelism.
TARGET_GRADIENT_THREADS = 65536
MIN_SEGMENT_OBSERVATIONS = 256


@cuda.jit
def group_residual_kernel(intensity, weight, g, group_start, ih_out, factor_out, phi_block):
    """Thread per group: Ih, factor -2 w r Ih per observation, Phi per block (fixed tree)."""
    phi_shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    phi = 0.0
    for grp in range(cuda.grid(1), ih_out.shape[0], cuda.gridsize(1)):
        lo = group_start[grp]
        hi = group_start[grp + 1]
        s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
        if s_wgg > 0.0:
            ih = s_wgi / s_wgg
            ih_out[grp] = ih
            for i in range(lo, hi):
                r = intensity[i] - g[i] * ih
                wr = weight[i] * r
                phi += wr * r
                factor_out[i] = -2.0 * wr * ih
        else:
            # No information on Ih: the group adds nothing (CPU kernel: `continue`).
            ih_out[grp] = 0.0
            for i in range(lo, hi):
                factor_out[i] = 0.0
    phi_shared[tid] = phi
    cuda.syncthreads()
    step = THREADS_PER_BLOCK // 2
    while step > 0:
        if tid < step:
            phi_shared[tid] += phi_shared[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        phi_block[cuda.blockIdx.x] = phi_shared[0]


@cuda.jit
def gradient_segment_kernel(factor, deriv_values, entry_flat, entry_offset, grad_partial):
    """Thread per (segment, column): sum factor * dg/dp over the column's entries in order.

    entry_flat: flat positions (obs * K + slot) of the used ELL slots, sorted by column then
    position; entry_offset[c, s]: first entry of column c in observation segment s.
    """
    n_segments = grad_partial.shape[0]
    n_params = grad_partial.shape[1]
    n_slots = deriv_values.shape[1]
    for idx in range(cuda.grid(1), n_segments * n_params, cuda.gridsize(1)):
        seg = idx // n_params
        col = idx - seg * n_params
        total = 0.0
        for e in range(entry_offset[col, seg], entry_offset[col, seg + 1]):
            flat = entry_flat[e]
            obs = flat // n_slots
            total += factor[obs] * deriv_values[obs, flat - obs * n_slots]
        grad_partial[seg, col] = total


@cuda.jit(device=True)
def _merged_means_kernel_one(intensity, weight, group_start, sigma_dynamic_range, mean_out,
                        sigma_out, grp):
    lo = group_start[grp]
    hi = group_start[grp + 1]
    w_min = math.inf
    for i in range(lo, hi):
        if weight[i] > 0.0 and weight[i] < w_min:
            w_min = weight[i]
    range_sq = sigma_dynamic_range * sigma_dynamic_range
    s_w = 0.0
    s_wi = 0.0
    for i in range(lo, hi):
        w = weight[i]
        if w > 0.0 and w * range_sq < w_min:
            s_w += w
            s_wi += w * intensity[i]
    if s_w > 0.0:
        mean_out[grp] = s_wi / s_w
        sigma_out[grp] = math.sqrt(1.0 / s_w)
    else:
        mean_out[grp] = 0.0
        sigma_out[grp] = 0.0


@cuda.jit
def merged_means_kernel(intensity, weight, group_start, sigma_dynamic_range, mean_out,
                        sigma_out):
    """Thread per group: inverse-variance weighted mean and sqrt(1 / sum w).

    Observations with w <= 0 are not used. With sigma_dynamic_range r > 0, as in the classical
    merge, an observation is used only if its sigma exceeds r times the largest sigma in the
    group (w r^2 < min w). A group with no usable observation gets mean 0, sigma 0.
    """
    for grp in range(cuda.grid(1), mean_out.shape[0], cuda.gridsize(1)):
        _merged_means_kernel_one(intensity, weight, group_start, sigma_dynamic_range, mean_out, sigma_out, grp)


@njit(cache=True)
def ordered_rows_sum(partials):
    """Sum of the rows of a 2-D array, added in row order."""
    total = np.zeros(partials.shape[1])
    for s in range(partials.shape[0]):
        for c in range(partials.shape[1]):
            total[c] += partials[s, c]
    return total


def _blocks(n_threads):
    return launch_blocks(n_threads)


def segment_bounds(n_obs, n_params):
    """Observation offsets (n_segments + 1) of the gradient segments: equal lengths."""
    by_occupancy = -(-TARGET_GRADIENT_THREADS // max(n_params, 1))
    by_length = max(1, -(-n_obs // MIN_SEGMENT_OBSERVATIONS))
    n_segments = max(1, min(by_occupancy, by_length))
    return (np.arange(n_segments + 1, dtype=np.int64) * n_obs) // n_segments


def column_entries(deriv_index, n_params, seg_bounds):
    """(entry_flat, entry_offset) for gradient_segment_kernel, from the ELL column indices.

    Depends only on which parameters each observation touches, which is fixed while the
    parameters move, so a minimiser builds it once (CudaTargetPlan).
    """
    n_obs, n_slots = deriv_index.shape
    cols = np.ascontiguousarray(deriv_index).reshape(-1).astype(np.int64)
    if cols.size and cols.max() >= n_params:
        raise ValueError(f"deriv_index refers to parameter {int(cols.max())} "
                         f"but n_params={n_params}")
    used = np.flatnonzero(cols >= 0)
    # Key (column, observation) orders entries by column, then by position in the data.
    stride = np.int64(n_obs + 1)
    keys = cols[used] * stride + used // n_slots
    order = np.argsort(keys, kind="stable")
    entry_flat = used[order]
    sorted_keys = keys[order]
    queries = np.arange(n_params, dtype=np.int64)[:, None] * stride + seg_bounds[None, :]
    entry_offset = np.searchsorted(sorted_keys, queries, side="left").astype(np.int64)
    return np.ascontiguousarray(entry_flat), np.ascontiguousarray(entry_offset)


class CudaTargetPlan:
    """Device-resident data of one Ih table; evaluate(g, deriv_values) per parameter step.

    intensity, weight (n,), deriv_index (n, K) and group_start (n_groups + 1) stay on the
    device; each evaluation uploads g and deriv_values only.
    """

    def __init__(self, intensity, weight, deriv_index, group_start, n_params):
        intensity = np.ascontiguousarray(intensity, dtype=np.float64)
        group_start = np.ascontiguousarray(group_start, dtype=np.int64)
        deriv_index = np.asarray(deriv_index)
        if deriv_index.ndim != 2 or deriv_index.shape[0] != intensity.size:
            raise ValueError(f"deriv_index must be (n_obs, K) with n_obs={intensity.size}, "
                             f"got shape {deriv_index.shape}")
        if group_start.size < 1 or group_start[0] != 0 or group_start[-1] != intensity.size:
            raise ValueError("group_start must run from 0 to the number of observations")
        self.n_obs = intensity.size
        self.n_slots = deriv_index.shape[1]
        self.n_groups = group_start.size - 1
        self.n_params = int(n_params)
        self.seg_bounds = segment_bounds(self.n_obs, self.n_params)
        self.n_segments = self.seg_bounds.size - 1
        entry_flat, entry_offset = column_entries(deriv_index, self.n_params, self.seg_bounds)
        self._intensity = cuda.to_device(intensity)
        self._weight = cuda.to_device(np.ascontiguousarray(weight, dtype=np.float64))
        self._group_start = cuda.to_device(group_start)
        # Zero-size device buffers are avoided: a 1-element placeholder is never read.
        self._entry_flat = cuda.to_device(entry_flat if entry_flat.size else np.zeros(1, np.int64))
        self._entry_offset = cuda.to_device(entry_offset if entry_offset.size
                                            else np.zeros((1, 1), np.int64))
        self._ih = cuda.device_array(max(self.n_groups, 1))
        self._factor = cuda.device_array(max(self.n_obs, 1))
        self._group_blocks = _blocks(self.n_groups)
        self._phi_block = cuda.device_array(self._group_blocks)
        self._grad_partial = cuda.device_array((self.n_segments, max(self.n_params, 1)))

    def _residuals(self, g):
        g_dev = cuda.to_device(np.ascontiguousarray(g, dtype=np.float64))
        ih = self._ih[: self.n_groups]
        group_residual_kernel[self._group_blocks, THREADS_PER_BLOCK](
            self._intensity, self._weight, g_dev, self._group_start, ih, self._factor,
            self._phi_block)

    def evaluate(self, g, deriv_values):
        """(sum w r^2, gradient (n_params,)) as numpy; restraints are the caller's."""
        deriv_values = np.ascontiguousarray(deriv_values, dtype=np.float64)
        if deriv_values.shape != (self.n_obs, self.n_slots):
            raise ValueError(f"deriv_values must be {(self.n_obs, self.n_slots)}, "
                             f"got {deriv_values.shape}")
        self._residuals(g)
        if self.n_params:
            n_threads = self.n_segments * self.n_params
            gradient_segment_kernel[_blocks(n_threads), THREADS_PER_BLOCK](
                self._factor, cuda.to_device(deriv_values), self._entry_flat,
                self._entry_offset, self._grad_partial)
            gradient = ordered_rows_sum(self._grad_partial.copy_to_host())
        else:
            gradient = np.zeros(0)
        phi = math.fsum(self._phi_block.copy_to_host().tolist())
        return phi, gradient

    def merged_intensity(self, g):
        """Ih per group for inverse scales g (0 where sum w g^2 = 0)."""
        self._residuals(g)
        return self._ih[: self.n_groups].copy_to_host()


def evaluate_target_cuda(intensity, weight, g, deriv_values, deriv_index, group_start,
                         n_params):
    """One target + gradient evaluation on the device; twin of target.target_and_gradient."""
    plan = CudaTargetPlan(intensity, weight, deriv_index, group_start, n_params)
    return plan.evaluate(g, deriv_values)


def merged_intensity_cuda(intensity, weight, g, group_start):
    """Twin of IhTable.merged_intensity: Ih = sum(w g I) / sum(w g^2) per group."""
    n_obs = np.asarray(intensity).size
    plan = CudaTargetPlan(intensity, weight, np.zeros((n_obs, 0), np.int32), group_start, 0)
    return plan.merged_intensity(g)


def merged_means_cuda(intensity, weight, group_start, sigma_dynamic_range=0.0):
    """(mean, sigma) per group: inverse-variance weighted mean and sqrt(1 / sum w)."""
    intensity = np.ascontiguousarray(intensity, dtype=np.float64)
    group_start = np.ascontiguousarray(group_start, dtype=np.int64)
    n_groups = group_start.size - 1
    mean = cuda.device_array(max(n_groups, 1))
    sigma = cuda.device_array(max(n_groups, 1))
    merged_means_kernel[_blocks(n_groups), THREADS_PER_BLOCK](
        cuda.to_device(intensity), cuda.to_device(np.ascontiguousarray(weight, np.float64)),
        cuda.to_device(group_start), float(sigma_dynamic_range), mean[:n_groups],
        sigma[:n_groups])
    return mean[:n_groups].copy_to_host(), sigma[:n_groups].copy_to_host()
