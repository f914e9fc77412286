"""The normal equations of the full-matrix round on the device: Phi, J^T W r and J^T W J.

Twin of dials_vmerge.scaling.target.normal_matrix_kernel (same formulas: J = dr/dp with the
dIh/dp term, accumulated per group over the union of the columns its observations touch).
One thread per segment of whole groups walks its groups in order into its own dense partial
(phi, rhs (n_par,), normal (n_par, n_par)) held in device memory, exactly as a CPU thread
walks a chunk; a second launch adds the segments' partial matrices entry by entry in segment
order. No floating-point atomics: the result is bitwise reproducible for a given number of
segments, and agrees with the CPU kernel (other chunking) to rounding. Only the rhs partials,
the per-segment phi and the one reduced n_par x n_par matrix cross the bus.

The segment count is bounded by the device memory of the dense partials (n_par^2 x 8 B each),
so this is the pass for the moderate parameter counts of a full-matrix round.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK  # noqa: E402
from .launch import blocks as launch_blocks  # noqa: E402
from .launch import group_weighted_sums
# Device memory for the segments' dense partial matrices, and the most segments worth
# launching (beyond that the per-segment zeroing and the reduction dominate).
PARTIAL_BUDGET_BYTES = 1 << 30
MAX_SEGMENTS = 4096
MIN_SEGMENT_OBSERVATIONS = 512


def _blocks(n):
    return launch_blocks(n)


@cuda.jit(device=True)
def _normal_segment_kernel_one(intensity, weight, g, deriv_values, deriv_col, group_start,
                          segment_groups, local_of_col, cols, dih, jrow, phi_partial,
                          rhs_partial, normal_partial, s):
    n_slots = deriv_values.shape[1]
    # normal_partial[s] is all zero here: zeroed once when allocated, then by the reduction
    # as it reads it (only the entries this segment touches are ever non-zero).
    for a in range(rhs_partial.shape[1]):
        local_of_col[s, a] = -1
        rhs_partial[s, a] = 0.0
    phi = 0.0
    for grp in range(segment_groups[s], segment_groups[s + 1]):
        lo = group_start[grp]
        hi = group_start[grp + 1]
        s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
        if s_wgg <= 0.0:
            continue
        ih = s_wgi / s_wgg
        n_local = 0
        for i in range(lo, hi):
            for k in range(n_slots):
                col = deriv_col[i, k]
                if col >= 0 and local_of_col[s, col] < 0:
                    local_of_col[s, col] = n_local
                    cols[s, n_local] = col
                    dih[s, n_local] = 0.0
                    n_local += 1
        for i in range(lo, hi):
            factor = weight[i] * (intensity[i] - 2.0 * g[i] * ih) / s_wgg
            for k in range(n_slots):
                col = deriv_col[i, k]
                if col >= 0:
                    dih[s, local_of_col[s, col]] += factor * deriv_values[i, k]
        for i in range(lo, hi):
            r = intensity[i] - g[i] * ih
            w = weight[i]
            phi += w * r * r
            for a in range(n_local):
                jrow[s, a] = -g[i] * dih[s, a]
            for k in range(n_slots):
                col = deriv_col[i, k]
                if col >= 0:
                    jrow[s, local_of_col[s, col]] -= ih * deriv_values[i, k]
            for a in range(n_local):
                wja = w * jrow[s, a]
                if wja == 0.0:
                    continue
                ca = cols[s, a]
                rhs_partial[s, ca] += wja * r
                for b in range(n_local):
                    normal_partial[s, ca, cols[s, b]] += wja * jrow[s, b]
        for a in range(n_local):
            local_of_col[s, cols[s, a]] = -1
    phi_partial[s] = phi


@cuda.jit
def normal_segment_kernel(intensity, weight, g, deriv_values, deriv_col, group_start,
                          segment_groups, local_of_col, cols, dih, jrow, phi_partial,
                          rhs_partial, normal_partial):
    for s in range(cuda.grid(1), segment_groups.shape[0] - 1, cuda.gridsize(1)):
        _normal_segment_kernel_one(intensity, weight, g, deriv_values, deriv_col, group_start, segment_groups, local_of_col, cols, dih, jrow, phi_partial, rhs_partial, normal_partial, s)


@cuda.jit
def ordered_segment_sum_kernel(partial, out):
    """Entries e, e + T, e + 2T, ... per thread (T threads in all, coalesced): out[e] = sum
    over segments of partial[s, e], in segment order; the partials are left zero for the
    next evaluation."""
    e = cuda.grid(1)
    stride = cuda.gridsize(1)
    while e < out.shape[0]:
        total = 0.0
        for s in range(partial.shape[0]):
            total += partial[s, e]
            partial[s, e] = 0.0
        out[e] = total
        e += stride


def segment_count(n_obs, n_groups, n_par, budget_bytes=PARTIAL_BUDGET_BYTES):
    by_memory = max(1, budget_bytes // max(8 * n_par * n_par, 1))
    by_length = max(1, n_obs // MIN_SEGMENT_OBSERVATIONS)
    return int(max(1, min(by_memory, by_length, MAX_SEGMENTS, max(n_groups, 1))))


class DeviceNormalEquations:
    """Scratch and partials of the normal-equation pass for one group-sorted table whose
    intensity, weight and group offsets are already on the device."""

    def __init__(self, intensity, weight, group_start_host, group_start, deriv_col, n_par,
                 n_segments=None, upload=None, segment_bounds=None):
        """segment_bounds: the segments' group offsets (issue 11: the job's key blocks of
        this MPI rank, whose partials evaluate_partials returns), instead of n_segments
        chunks of about equal size."""
        from dials_vmerge.scaling.ih_table import chunk_bounds

        self.intensity, self.weight, self.group_start = intensity, weight, group_start
        self.n_par = int(n_par)
        n_obs = int(group_start_host[-1])
        n_groups = group_start_host.size - 1
        if n_segments is None:
            n_segments = segment_count(n_obs, n_groups, self.n_par)
        if segment_bounds is not None:
            bounds = np.ascontiguousarray(segment_bounds, dtype=np.int64)
        else:
            bounds = chunk_bounds(np.asarray(group_start_host, np.int64), n_segments)
        self.n_segments = bounds.size - 1
        self.segment_groups = cuda.to_device(bounds)
        if hasattr(deriv_col, "copy_to_host"):  # already on the device (a resident table)
            self.deriv_col = deriv_col
        else:
            self.deriv_col = (upload or cuda.to_device)(np.ascontiguousarray(deriv_col,
                                                                              dtype=np.int64))
        s, p = self.n_segments, max(self.n_par, 1)
        self.local_of_col = cuda.device_array((s, p), np.int64)
        self.cols = cuda.device_array((s, p), np.int64)
        self.dih = cuda.device_array((s, p))
        self.jrow = cuda.device_array((s, p))
        self.phi_partial = cuda.device_array(s)
        self.rhs_partial = cuda.device_array((s, p))
        self.normal_partial = cuda.to_device(np.zeros((s, p, p)))
        self.normal = cuda.device_array(p * p)

    def evaluate(self, g, deriv_values):
        """(phi, J^T W r, J^T W J) for device arrays g (n,) and deriv_values (n, K)."""
        normal_segment_kernel[_blocks(self.n_segments), THREADS_PER_BLOCK](
            self.intensity, self.weight, g, deriv_values, self.deriv_col, self.group_start,
            self.segment_groups, self.local_of_col, self.cols, self.dih, self.jrow,
            self.phi_partial, self.rhs_partial, self.normal_partial)
        p = max(self.n_par, 1)
        flat = self.normal_partial.reshape(self.n_segments, p * p)
        ordered_segment_sum_kernel[_blocks(p * p), THREADS_PER_BLOCK](flat, self.normal)
        phi = math.fsum(self.phi_partial.copy_to_host().tolist())
        rhs_partial = self.rhs_partial.copy_to_host()
        rhs = np.zeros(p)
        for row in rhs_partial:  # segment order
            rhs += row
        normal = self.normal.copy_to_host().reshape(p, p)
        return phi, rhs[:self.n_par], normal[:self.n_par, :self.n_par]

    def evaluate_partials(self, g, deriv_values):
        """(phi (s,), J^T W r (s, n_par), J^T W J (s, n_par, n_par)) of each segment: one
        thread's sequential pass over the segment's groups, so a segment's partials depend on
        its groups alone (the key-block sums of issue 11 add them as block_sums' tree)."""
        s = self.n_segments
        if s == 0:
            return np.zeros(0), np.zeros((0, self.n_par)), np.zeros((0, self.n_par, self.n_par))
        normal_segment_kernel[_blocks(s), THREADS_PER_BLOCK](
            self.intensity, self.weight, g, deriv_values, self.deriv_col, self.group_start,
            self.segment_groups, self.local_of_col, self.cols, self.dih, self.jrow,
            self.phi_partial, self.rhs_partial, self.normal_partial)
        p = max(self.n_par, 1)
        normal = self.normal_partial.copy_to_host()
        # the reduction zeroes the partials for the next evaluation (its sum is not used)
        ordered_segment_sum_kernel[_blocks(p * p), THREADS_PER_BLOCK](
            self.normal_partial.reshape(s, p * p), self.normal)
        phi = self.phi_partial.copy_to_host()
        rhs = self.rhs_partial.copy_to_host()
        return (phi, rhs[:, :self.n_par].copy(),
                normal[:, :self.n_par, :self.n_par].copy())
