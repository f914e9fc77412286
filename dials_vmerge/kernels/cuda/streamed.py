"""The scaling target over a layout larger than free device memory: observations stay on the
host and each batch of whole groups is streamed up, evaluated and its partials copied down.

DeviceTarget (kernels.cuda.target) keeps every observation array on the device. When the
layout does not fit (layout_fits), HostStreamedTarget keeps the per-observation arrays (I, w,
the model's per-row inputs) in page-locked host memory and per batch, on one of two CUDA
streams, copies that batch's slice into one of two reusable device buffer sets (double
buffering, each sized to the largest batch), launches the model kernel (g and dg/dp of the
batch, given by the caller), the residual and gradient kernels, and copies the partials down.
Batch k+1's copies run on the other stream while batch k computes; reusing a buffer set is
safe without a host wait because everything of one buffer set is queued on one stream.

The batches, launches and partial sums are those of DeviceTarget with the same batch size,
and the sums are added on the host in batch order, so Phi and the gradient are bit-identical
to the device-resident path.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from dials_vmerge.backends.cuda_target import (THREADS_PER_BLOCK, gradient_segment_kernel,
                                               group_residual_kernel,
                                               segment_bounds)
from dials_vmerge.kernels.cuda.target import (N_STREAMS, column_entries, group_batches,
                                              sum_batches_on_streams)
from dials_vmerge.kernels.cuda.launch import blocks

# Share of the free device memory a scaling job may use (the rest: kernels, other passes).
FREE_FRACTION = 0.8


def free_device_bytes(device_memory_limit=None):
    """Free device memory in bytes (inf when unknown, e.g. under the simulator), capped at
    device_memory_limit (compute.gpu.device_memory_limit) when given."""
    try:
        free, _total = cuda.current_context().get_memory_info()
        free = float(free)
    except Exception:
        free = math.inf
    if device_memory_limit is not None:
        free = min(free, float(device_memory_limit))
    return free


def layout_fits(n_bytes, device_memory_limit=None):
    """Whether a device-resident layout of n_bytes fits in the usable free device memory."""
    return n_bytes <= FREE_FRACTION * free_device_bytes(device_memory_limit)


def streamed_batch_size(n_obs, bytes_per_observation, device_memory_limit=None):
    """Observations per batch so that the two buffer sets fit in usable free memory."""
    free = free_device_bytes(device_memory_limit)
    if not math.isfinite(free):
        return max(int(n_obs), 1)
    fit = int(FREE_FRACTION * free) // max(2 * int(bytes_per_observation), 1)
    return max(1, min(int(n_obs), fit))


def _pinned_copy(array):
    """A page-locked host copy of array (a plain copy where pinning is refused), so the
    per-batch copies to the device can be asynchronous."""
    array = np.ascontiguousarray(array)
    try:
        out = cuda.pinned_array(array.shape, dtype=array.dtype)
    except Exception:  # out of page-locked memory: pageable, synchronous copies
        return array.copy()
    out[...] = array
    return out


class _StreamedBatch:
    """One batch of whole groups: its host-side offsets and column entries, its partials."""

    def __init__(self, obs_lo, obs_hi, group_start_local, deriv_col_local, n_params):
        self.obs_lo, self.obs_hi = int(obs_lo), int(obs_hi)
        self.n_obs = self.obs_hi - self.obs_lo
        self.n_groups = group_start_local.size - 1
        self.seg_bounds = segment_bounds(self.n_obs, n_params)
        self.n_segments = self.seg_bounds.size - 1
        flat, offset = column_entries(deriv_col_local, n_params, self.seg_bounds)
        self.host = {
            "group_start": _pinned_copy(group_start_local.astype(np.int64)),
            "entry_flat": _pinned_copy(flat if flat.size else np.zeros(1, np.int64)),
            "entry_offset": _pinned_copy(offset if offset.size else np.zeros((1, 1), np.int64)),
        }
        self.group_blocks = blocks(self.n_groups)
        self.phi_block = cuda.device_array(self.group_blocks)
        self.grad_partial = cuda.device_array((self.n_segments, max(n_params, 1)))
        self.phi_host = cuda.pinned_array(self.group_blocks)
        self.grad_host = cuda.pinned_array((self.n_segments, max(n_params, 1)))


def _view(flat_buffer, shape):
    """The first prod(shape) elements of a flat device buffer as an array of shape."""
    size = int(np.prod(shape)) if len(shape) else 1
    return flat_buffer[:max(size, 1)].reshape(tuple(max(int(s), 1) if i == 0 else int(s)
                                                    for i, s in enumerate(shape)))


class HostStreamedTarget:
    """sum w (I - g Ih)^2 and its gradient over a host-resident group-sorted table.

    model_inputs: name -> per-observation host array (first axis n_obs) that the model kernel
    reads; evaluate(launch_model) calls launch_model(stream, inputs, g, deriv) per batch with
    the batch's device views (inputs by name, g (m,), deriv (m, K)) to fill g and deriv;
    inputs["rows"]: the batch's table rows (lo, hi), inputs["buffer_set"]: its stream's
    index (a model with buffers of its own per stream, e.g. per-family inputs).
    """

    host_resident = True

    def __init__(self, intensity, weight, group_start, deriv_col, n_params, batch_size,
                 model_inputs):
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
        self.batch_size = int(batch_size)
        self.host = {"intensity": _pinned_copy(intensity),
                     "weight": _pinned_copy(np.asarray(weight, dtype=np.float64))}
        for name, array in model_inputs.items():
            if np.asarray(array).shape[0] != self.n_obs:
                raise ValueError(f"model input {name} must have n_obs={self.n_obs} rows")
            self.host[name] = _pinned_copy(array)
        self.batches = []
        bounds = group_batches(group_start, self.batch_size) if self.n_groups else [0, 0]
        for b in range(len(bounds) - 1):
            g_lo, g_hi = int(bounds[b]), int(bounds[b + 1])
            lo, hi = int(group_start[g_lo]), int(group_start[g_hi])
            self.batches.append(_StreamedBatch(lo, hi, group_start[g_lo:g_hi + 1] - lo,
                                               deriv_col[lo:hi], self.n_params))
        used = [b for b in self.batches if b.n_obs]
        n_streams = N_STREAMS if len(used) > 1 else 1
        self._streams = [cuda.stream() for _ in range(n_streams)]
        self._buffers = [self._buffer_set(used) for _ in range(n_streams)]

    def _buffer_set(self, used):
        """Flat device buffers for one batch in flight, each sized to the largest batch."""
        max_obs = max([b.n_obs for b in used] + [1])
        sizes = {"g": max_obs, "factor": max_obs, "deriv": max_obs * max(self.n_slots, 1),
                 "ih": max([b.n_groups for b in used] + [1])}
        for name, array in self.host.items():
            sizes[name] = max_obs * int(np.prod(array.shape[1:]))
        for name in ("group_start", "entry_flat", "entry_offset"):
            sizes[name] = max([b.host[name].size for b in used] + [1])
        dtypes = {name: array.dtype for name, array in self.host.items()}
        dtypes.update(group_start=np.int64, entry_flat=np.int64, entry_offset=np.int64)
        return {name: cuda.device_array(max(int(size), 1), dtype=dtypes.get(name, np.float64))
                for name, size in sizes.items()}

    def device_bytes(self):
        """Device bytes of the two buffer sets (the streamed job's observation storage)."""
        return sum(int(a.nbytes) for buffers in self._buffers for a in buffers.values())

    def _upload(self, batch, buffers, stream):
        """The batch's slices into the buffer set, on the stream; their device views."""
        views = {}
        sl = slice(batch.obs_lo, batch.obs_hi)
        for name, array in self.host.items():
            part = array[sl]
            view = _view(buffers[name], part.shape)
            view.copy_to_device(part, stream=stream)
            views[name] = view
        for name, array in batch.host.items():
            view = _view(buffers[name], array.shape)
            view.copy_to_device(array, stream=stream)
            views[name] = view
        views["g"] = _view(buffers["g"], (batch.n_obs,))
        views["factor"] = _view(buffers["factor"], (batch.n_obs,))
        views["deriv"] = _view(buffers["deriv"], (batch.n_obs, self.n_slots))
        views["ih"] = _view(buffers["ih"], (max(batch.n_groups, 1),))
        views["rows"] = (batch.obs_lo, batch.obs_hi)  # host-evaluated or per-family models
        return views

    def evaluate(self, launch_model):
        """(Phi, gradient (n_params,)); launch_model fills g and dg/dp of each batch."""
        def launch(batch, stream_index, stream):
            v = self._upload(batch, self._buffers[stream_index], stream)
            v["buffer_set"] = stream_index  # a model's own per-stream buffers
            launch_model(stream, v, v["g"], v["deriv"])
            group_residual_kernel[batch.group_blocks, THREADS_PER_BLOCK, stream](
                v["intensity"], v["weight"], v["g"], v["group_start"], v["ih"], v["factor"],
                batch.phi_block)
            if self.n_params:
                n_threads = batch.n_segments * self.n_params
                gradient_segment_kernel[blocks(n_threads), THREADS_PER_BLOCK, stream](
                    v["factor"], v["deriv"], v["entry_flat"], v["entry_offset"],
                    batch.grad_partial)

        return sum_batches_on_streams([b for b in self.batches if b.n_obs], self._streams,
                                      self.n_params, launch)
