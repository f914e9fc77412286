"""The scaling target and gradient over device-resident observations, in batches of groups.

The observation arrays (I, w, group offsets, the gradient's column entries) go to the device
once, when the plan is built; each evaluation takes g and dg/dp already on the device (from
kernels.cuda.models) and returns (Phi, gradient) on the host. Per batch of whole groups two
launches (backends.cuda_target): a thread per group for Ih, Phi per block and the
per-observation factor -2 w r Ih, then a thread per (segment, column) for the gradient.

Reduction order, fixed: the per-block Phi of all batches are added exactly (math.fsum), so
Phi does not depend on the batching; gradient rows are added per batch in segment order and
the batches in order, so the gradient is bitwise reproducible for a given batch size and
agrees to rounding across batch sizes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from numba import njit

from dials_vmerge.kernels.cuda.launch import blocks as launch_blocks
from dials_vmerge.kernels.cuda.resident_rows import column_entries_on_device, shift_kernel

from dials_vmerge.backends.cuda_target import (THREADS_PER_BLOCK, gradient_segment_kernel,
                                               group_residual_kernel, ordered_rows_sum,
                                               segment_bounds)

# Device bytes per observation of a scaling job besides the model's own inputs: I, w, g,
# factor (8 B each), K ELL values (8 B) and entries (8 B) at K <= 9, and the group offsets.
BYTES_PER_OBSERVATION_ESTIMATE = 4 * 8 + 9 * 16 + 8


def _blocks(n):
    return launch_blocks(n)


def auto_batch_size(n_obs, bytes_per_observation=BYTES_PER_OBSERVATION_ESTIMATE,
                    free_fraction=0.8):
    """Observations per batch so that one job fits in free device memory (all of n_obs when
    it fits)."""
    try:
        free, _total = cuda.current_context().get_memory_info()
    except Exception:  # no memory info: no batching
        return max(int(n_obs), 1)
    if not math.isfinite(free):  # the simulator reports unlimited memory
        return max(int(n_obs), 1)
    fit = int(free * free_fraction) // max(int(bytes_per_observation), 1)
    return max(1, min(int(n_obs), fit))


def group_batches(group_start, batch_size):
    """Group offsets [b0=0, b1, ..., n_groups] of batches of whole groups with at most
    batch_size observations each (a larger group makes a batch of its own)."""
    group_start = np.asarray(group_start, dtype=np.int64)
    n_groups = group_start.size - 1
    bounds = [0]
    while bounds[-1] < n_groups:
        first = bounds[-1]
        limit = group_start[first] + max(int(batch_size), 1)
        # last group end within the limit; at least one group per batch
        end = int(np.searchsorted(group_start, limit, side="right")) - 1
        bounds.append(max(end, first + 1))
    return np.asarray(bounds, dtype=np.int64)


@njit(cache=True)
def _column_entries_kernel(cols, n_slots, n_params, seg_bounds):
    counts = np.zeros(n_params + 1, np.int64)
    for e in range(cols.size):
        if cols[e] >= 0:
            counts[cols[e] + 1] += 1
    for c in range(n_params):
        counts[c + 1] += counts[c]
    entry_flat = np.empty(counts[n_params], np.int64)
    fill = counts[:n_params].copy()
    for e in range(cols.size):
        c = cols[e]
        if c >= 0:
            entry_flat[fill[c]] = e
            fill[c] += 1
    n_bounds = seg_bounds.size
    entry_offset = np.empty((n_params, n_bounds), np.int64)
    for c in range(n_params):
        j = counts[c]
        for s in range(n_bounds):
            limit = seg_bounds[s] * n_slots  # observation < bound <=> flat position < limit
            while j < counts[c + 1] and entry_flat[j] < limit:
                j += 1
            entry_offset[c, s] = j
    return entry_flat, entry_offset


def column_entries(deriv_col, n_params, seg_bounds):
    """(entry_flat, entry_offset) for gradient_segment_kernel: the used ELL slots (flat
    positions obs * K + slot) ordered by column, then position; entry_offset[c, s] is the
    first entry of column c in segment s. The same arrays as backends.cuda_target's
    column_entries, by a counting sort in O(n K) instead of an argsort (1e8 observations)."""
    n_obs, n_slots = deriv_col.shape
    cols = np.ascontiguousarray(deriv_col).reshape(-1).astype(np.int64)
    if cols.size and cols.max() >= n_params:
        raise ValueError(f"deriv_col refers to parameter {int(cols.max())} "
                         f"but n_params={n_params}")
    return _column_entries_kernel(cols, np.int64(n_slots), np.int64(n_params),
                                  np.asarray(seg_bounds, dtype=np.int64))


class _Batch:
    def __init__(self, obs_lo, obs_hi, group_start_local, deriv_col_local, n_params,
                 upload=cuda.to_device, device_group_start=None, device_cols=None):
        """device_group_start (the batch's groups' offsets in the whole table, not yet
        made batch-local) and device_cols (the batch's ELL columns): already on the device
        (a table derived there, kernels.cuda.resident_rows); the batch's offsets and
        column entries are then made on the device too."""
        self.obs_lo, self.obs_hi = int(obs_lo), int(obs_hi)
        self.n_obs = self.obs_hi - self.obs_lo
        self.n_groups = group_start_local.size - 1
        self.seg_bounds = segment_bounds(self.n_obs, n_params)
        self.n_segments = self.seg_bounds.size - 1
        if device_group_start is not None:
            if self.obs_lo == 0:
                self.group_start = device_group_start
            else:
                self.group_start = cuda.device_array(self.n_groups + 1, np.int64)
                shift_kernel[_blocks(self.n_groups + 1), THREADS_PER_BLOCK](
                    device_group_start, self.obs_lo, self.group_start)
        else:
            self.group_start = upload(np.ascontiguousarray(group_start_local))
        entries = None
        if device_cols is not None and self.n_obs and n_params:
            # None only past entry_plan's reach (~2^38 slots): then the host's entries go
            # up, as without a resident table
            entries = column_entries_on_device(device_cols, n_params, self.n_segments)
        if entries is not None:
            self.entry_flat, self.entry_offset = entries
        else:
            flat, offset = column_entries(deriv_col_local, n_params, self.seg_bounds)
            self.entry_flat = upload(flat if flat.size else np.zeros(1, np.int64))
            self.entry_offset = upload(offset if offset.size else np.zeros((1, 1), np.int64))
        self.group_blocks = _blocks(self.n_groups)
        self.phi_block = cuda.device_array(self.group_blocks)
        self.grad_partial = cuda.device_array((self.n_segments, max(n_params, 1)))
        self.ih = cuda.device_array(max(self.n_groups, 1))
        # page-locked host copies of the partials: their copies run on the batch's stream,
        # overlapping the next batch's kernels
        self.phi_host = cuda.pinned_array(self.group_blocks)
        self.grad_host = cuda.pinned_array((self.n_segments, max(n_params, 1)))


# Batches in flight at once (copy of one while the other computes): two CUDA streams.
N_STREAMS = 2


def batch_partials_on_streams(batches, streams, n_params, launch):
    """(Phi per batch (n,), gradient per batch (n, n_params)) of batches enqueued as in
    sum_batches_on_streams: each batch's Phi is its per-block partials added exactly
    (math.fsum) and its gradient its segment rows added in order, so a batch's partials
    depend on the batch's groups alone (issue 11: batches that are the job's key blocks
    give the same partials whichever MPI rank evaluates them)."""
    phi = np.zeros(len(batches))
    gradient = np.zeros((len(batches), n_params))
    pending = [None] * len(streams)  # (batch index, batch) each stream is copying

    def collect(k):
        if pending[k] is None:
            return
        index, batch = pending[k]
        streams[k].synchronize()
        phi[index] = math.fsum(batch.phi_host.tolist())
        if n_params:
            gradient[index] = ordered_rows_sum(batch.grad_host)
        pending[k] = None

    for index, batch in enumerate(batches):
        k = index % len(streams)
        collect(k)
        stream = streams[k]
        launch(batch, k, stream)
        batch.phi_block.copy_to_host(batch.phi_host, stream=stream)
        if n_params:
            batch.grad_partial.copy_to_host(batch.grad_host, stream=stream)
        pending[k] = (index, batch)
    for k in range(len(streams)):
        collect(k)
    return phi, gradient


def sum_batches_on_streams(batches, streams, n_params, launch):
    """(Phi, gradient) of batches whose kernels launch(batch, stream_index, stream) enqueues (leaving the
    batch's phi_block and, with parameters, grad_partial filled on the device).

    Batches alternate between the streams: batch k+1's copies and kernels overlap batch k's
    copy of its partials into its pinned host buffers. Each stream's previous batch is
    collected before the stream is reused, and partials are added in batch order whatever
    the streams did, so the result does not depend on the overlap."""
    pending = [None] * len(streams)  # the batch whose partials each stream is copying
    phi_parts = []
    gradient = np.zeros(n_params)

    def collect(k):
        batch = pending[k]
        if batch is None:
            return
        streams[k].synchronize()
        phi_parts.extend(batch.phi_host.tolist())
        if n_params:
            gradient[:] += ordered_rows_sum(batch.grad_host)
        pending[k] = None

    for index, batch in enumerate(batches):
        k = index % len(streams)
        collect(k)  # batch index - 2 on this stream: its buffers are free again
        stream = streams[k]
        launch(batch, k, stream)
        batch.phi_block.copy_to_host(batch.phi_host, stream=stream)
        if n_params:
            batch.grad_partial.copy_to_host(batch.grad_host, stream=stream)
        pending[k] = batch
        if len(streams) > 1 and k == len(streams) - 1:
            # keep batch order of the sums: the older stream's batch first
            collect((k + 1) % len(streams))
    for j in range(len(streams)):  # the last batches, oldest first
        collect((len(batches) + j) % len(streams))
    return math.fsum(phi_parts), gradient


class DeviceTarget:
    """sum w (I - g Ih)^2 and its gradient over one group-sorted table kept on the device."""

    def __init__(self, intensity, weight, group_start, deriv_col, n_params, batch_size=None,
                 upload=None, columns=None, device_group_start=None, device_cols=None,
                 group_bounds=None):
        """upload(host array): its device copy (default cuda.to_device; the run passes its
        job table's counted upload). columns: (intensity, weight) already on the device
        (gathered there from the job's resident arrays), used instead of uploading them.
        device_group_start, device_cols: the table's group offsets and ELL columns already
        on the device (equal to group_start and deriv_col): each batch's offsets and column
        entries are then derived there, nothing with a row per observation goes up.
        group_bounds: group offsets of the batches (issue 11: the job's key blocks of this
        MPI rank, whose partials evaluate_partials returns one per bound pair), instead of
        batches of batch_size observations; empty ones get no batch."""
        upload = upload or cuda.to_device
        intensity = np.ascontiguousarray(intensity, dtype=np.float64)
        group_start = np.ascontiguousarray(group_start, dtype=np.int64)
        deriv_col = np.asarray(deriv_col)
        if deriv_col.ndim != 2 or deriv_col.shape[0] != intensity.size:
            raise ValueError(f"deriv_col must be (n_obs, K) with n_obs={intensity.size}")
        if group_start.size < 1 or group_start[0] != 0 or group_start[-1] != intensity.size:
            raise ValueError("group_start must run from 0 to the number of observations")
        self.n_obs = intensity.size
        self.n_slots = deriv_col.shape[1]
        self.n_params = int(n_params)
        self.n_groups = group_start.size - 1
        explicit_batch_size = batch_size is not None
        if batch_size is None:
            batch_size = auto_batch_size(self.n_obs)
        self.batch_size = int(batch_size)
        if columns is not None:
            self.intensity, self.weight = columns
        else:
            self.intensity = upload(intensity)
            self.weight = upload(np.ascontiguousarray(weight, dtype=np.float64))
        self.factor = cuda.device_array(max(self.n_obs, 1))
        self.batches = []
        # (group offsets of a batch, the bound pair it belongs to)
        pieces = []
        if group_bounds is not None:
            bounds = np.asarray(group_bounds, dtype=np.int64)
            for b in range(len(bounds) - 1):
                g_lo, g_hi = int(bounds[b]), int(bounds[b + 1])
                if g_lo == g_hi:
                    continue
                if not explicit_batch_size:
                    # a key block is at most max(4096, n_obs / 512) observations: one batch
                    # (not the rank's free memory, which would make the partials depend on
                    # the device and the rank's share)
                    pieces.append((g_lo, g_hi, b))
                    continue
                # compute.gpu.batch_size: the block cut by its own group sizes alone
                local = group_batches(group_start[g_lo:g_hi + 1] - group_start[g_lo],
                                      self.batch_size) + g_lo
                pieces.extend((int(lo), int(hi), b) for lo, hi in zip(local[:-1], local[1:]))
        else:
            bounds = group_batches(group_start, self.batch_size) if self.n_groups else [0, 0]
            pieces = [(int(bounds[b]), int(bounds[b + 1]), b) for b in range(len(bounds) - 1)]
        self.group_bounds = bounds
        # the bound pair of each batch (evaluate_partials adds a batch's partials there)
        self.batch_slot = []
        for g_lo, g_hi, b in pieces:
            self.batch_slot.append(b)
            lo, hi = int(group_start[g_lo]), int(group_start[g_hi])
            self.batches.append(_Batch(
                lo, hi, group_start[g_lo:g_hi + 1] - lo, deriv_col[lo:hi], self.n_params,
                upload,
                None if device_group_start is None else device_group_start[g_lo:g_hi + 1],
                None if device_cols is None else device_cols[lo:hi]))

    def _residuals_and_gradient(self, g, deriv_values, batch, stream):
        """One batch's residual pass and, with parameters, its per-segment gradient partials
        (the launch of evaluate and of evaluate_partials)."""
        self._residuals(g, batch, stream)
        if self.n_params:
            sl = slice(batch.obs_lo, batch.obs_hi)
            n_threads = batch.n_segments * self.n_params
            gradient_segment_kernel[_blocks(n_threads), THREADS_PER_BLOCK, stream](
                self.factor[sl], deriv_values[sl], batch.entry_flat, batch.entry_offset,
                batch.grad_partial)

    def _residuals(self, g, batch, stream=0):
        sl = slice(batch.obs_lo, max(batch.obs_hi, batch.obs_lo + 1))
        group_residual_kernel[batch.group_blocks, THREADS_PER_BLOCK, stream](
            self.intensity[sl], self.weight[sl], g[sl], batch.group_start,
            batch.ih[:max(batch.n_groups, 1)] if batch.n_groups else batch.ih,
            self.factor[sl], batch.phi_block)

    def evaluate(self, g, deriv_values, g_host=None, deriv_host=None):
        """(Phi, gradient (n_params,)) for device arrays g (n,) and deriv_values (n, K).

        With g_host and deriv_host (a model evaluated on the host), each batch's slice is
        copied into g and deriv_values on the batch's stream just before its kernels.
        Batches alternate between two CUDA streams: batch k+1's copies (its inputs up, its
        partials down into pinned buffers) overlap batch k's kernels. The partials are
        added on the host in batch order whatever the streams did, so the result does not
        depend on the overlap."""
        streams = self._streams()

        def launch(batch, stream_index, stream):
            if g_host is not None:
                sl = slice(batch.obs_lo, batch.obs_hi)
                g[sl].copy_to_device(g_host[sl], stream=stream)
                deriv_values[sl].copy_to_device(deriv_host[sl], stream=stream)
            self._residuals_and_gradient(g, deriv_values, batch, stream)

        return sum_batches_on_streams([b for b in self.batches if b.n_obs], streams,
                                      self.n_params, launch)

    def evaluate_partials(self, g, deriv_values):
        """(Phi (n_bounds,), gradient (n_bounds, n_params)): the partials of each bound pair of
        group_bounds (exact zeros for an empty one), for device arrays g and deriv_values;
        each depends on its groups alone (batch_partials_on_streams)."""
        streams = self._streams()

        def launch(batch, stream_index, stream):
            self._residuals_and_gradient(g, deriv_values, batch, stream)

        used = [k for k, b in enumerate(self.batches) if b.n_obs]
        phi_used, grad_used = batch_partials_on_streams([self.batches[k] for k in used],
                                                        streams, self.n_params, launch)
        n_slots = max(len(self.group_bounds) - 1, 0)
        phi_parts = [[] for _ in range(n_slots)]
        gradient = np.zeros((n_slots, self.n_params))
        for j, k in enumerate(used):  # a block's batches in order
            phi_parts[self.batch_slot[k]].append(phi_used[j])
            gradient[self.batch_slot[k]] += grad_used[j]
        phi = np.array([math.fsum(parts) for parts in phi_parts])
        return phi, gradient

    def _streams(self):
        """Two CUDA streams when there are several batches (one, the default, otherwise)."""
        if getattr(self, "_stream_list", None) is None:
            n = N_STREAMS if len(self.batches) > 1 else 1
            self._stream_list = [cuda.stream() for _ in range(n)]
        return self._stream_list

    def merged_intensity(self, g):
        """Ih per group (0 where sum w g^2 = 0), for device g."""
        out = []
        for batch in self.batches:
            if batch.n_obs == 0:
                out.append(np.zeros(batch.n_groups))
                continue
            self._residuals(g, batch)
            out.append(batch.ih.copy_to_host()[:batch.n_groups])
        return np.concatenate(out) if out else np.zeros(0)
