"""The normal equations of a full-matrix round over a layout streamed from the host.

kernels.cuda.normal computes Phi, J^T W r and J^T W J over a device-resident table. When the
table stays on the host (kernels.cuda.streamed.HostStreamedTarget), each batch of whole groups
is copied up on one of two CUDA streams into that stream's buffer set (I, w, the model's
per-row inputs, the batch's group offsets and the free column of each dg/dp slot), the model
kernel fills g and dg/dp there, and the same segment kernel and ordered segment sum as the
resident pass reduce the batch to one n_par x n_par matrix, copied down into page-locked
memory while the next batch computes on the other stream.

Reduction order, fixed: within a batch as kernels.cuda.normal (segments in order); the
batches' matrices and right-hand sides are added on the host in batch order and the per-segment
Phi with math.fsum. Agrees with the resident pass and the CPU kernel to rounding (other
segmentation), and is bitwise reproducible for a given batch size.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK
from .launch import blocks as launch_blocks
from .normal import (PARTIAL_BUDGET_BYTES, normal_segment_kernel, ordered_segment_sum_kernel,
                     segment_count)
from .streamed import _pinned_copy, _view

# A streamed job is short of device memory: each stream's dense partials get this share of
# the resident pass's budget.
STREAMED_PARTIAL_BUDGET_BYTES = PARTIAL_BUDGET_BYTES // 8


class StreamedNormalEquations:
    """(Phi, J^T W r, J^T W J) over the batches of a HostStreamedTarget.

    free_col: (n_obs, K) the free parameter of each dg/dp slot (-1: fixed or guard), in the
    table's row order; n_par: free parameters."""

    def __init__(self, streamed, free_col, n_par):
        from dials_vmerge.scaling.ih_table import chunk_bounds

        self.streamed = streamed
        self.n_par = int(n_par)
        p = max(self.n_par, 1)
        self.free_col = _pinned_copy(np.ascontiguousarray(free_col, dtype=np.int64))
        self.batches = [b for b in streamed.batches if b.n_obs]
        self.segment_groups = []
        for batch in self.batches:
            gs = np.asarray(batch.host["group_start"], dtype=np.int64)
            n_segments = segment_count(batch.n_obs, batch.n_groups, self.n_par,
                                       STREAMED_PARTIAL_BUDGET_BYTES)
            self.segment_groups.append(_pinned_copy(chunk_bounds(gs, n_segments)))
        s_max = max([b.size - 1 for b in self.segment_groups] + [1])
        obs_max = max([b.n_obs for b in self.batches] + [1])
        self._streams = streamed._streams
        self._scratch = []
        for _ in self._streams:
            self._scratch.append({
                "free_col": cuda.device_array(obs_max * max(streamed.n_slots, 1), np.int64),
                "segment_groups": cuda.device_array(s_max + 1, np.int64),
                "local_of_col": cuda.device_array((s_max, p), np.int64),
                "cols": cuda.device_array((s_max, p), np.int64),
                "dih": cuda.device_array((s_max, p)),
                "jrow": cuda.device_array((s_max, p)),
                "phi_partial": cuda.device_array(s_max),
                "rhs_partial": cuda.device_array((s_max, p)),
                # zero once: the ordered sum leaves the partials zero after reading them
                "normal_partial": cuda.to_device(np.zeros((s_max, p, p))),
                "normal": cuda.device_array(p * p),
                "phi_host": cuda.pinned_array(s_max),
                "rhs_host": cuda.pinned_array((s_max, p)),
                "normal_host": cuda.pinned_array(p * p),
            })

    def _upload(self, batch, buffers, stream):
        """The batch's I, w, model inputs and group offsets into the stream's buffer set."""
        views = {}
        rows = slice(batch.obs_lo, batch.obs_hi)
        for name, array in self.streamed.host.items():
            part = array[rows]
            views[name] = _view(buffers[name], part.shape)
            views[name].copy_to_device(part, stream=stream)
        group_start = batch.host["group_start"]
        views["group_start"] = _view(buffers["group_start"], group_start.shape)
        views["group_start"].copy_to_device(group_start, stream=stream)
        views["g"] = _view(buffers["g"], (batch.n_obs,))
        views["deriv"] = _view(buffers["deriv"], (batch.n_obs, self.streamed.n_slots))
        views["rows"] = (batch.obs_lo, batch.obs_hi)  # for models evaluated on the host
        return views

    def evaluate(self, launch_model):
        """launch_model(stream, inputs, g, deriv) fills the batch's g and dg/dp."""
        p = max(self.n_par, 1)
        n_streams = len(self._streams)
        pending = [None] * n_streams
        phi_parts = []
        rhs = np.zeros(p)
        normal = np.zeros((p, p))

        def collect(k):
            if pending[k] is None:
                return
            n_segments = pending[k]
            self._streams[k].synchronize()
            scratch = self._scratch[k]
            phi_parts.extend(scratch["phi_host"][:n_segments].tolist())
            for row in scratch["rhs_host"][:n_segments]:  # segment order
                rhs[:] += row
            normal[:] += scratch["normal_host"].reshape(p, p)
            pending[k] = None

        for index, batch in enumerate(self.batches):
            k = index % n_streams
            collect(k)
            stream, scratch = self._streams[k], self._scratch[k]
            v = self._upload(batch, self.streamed._buffers[k], stream)
            v["buffer_set"] = k  # a model's own per-stream buffers (the target's streams)
            launch_model(stream, v, v["g"], v["deriv"])
            free_col = _view(scratch["free_col"], (batch.n_obs, self.streamed.n_slots))
            free_col.copy_to_device(self.free_col[batch.obs_lo:batch.obs_hi], stream=stream)
            bounds = self.segment_groups[index]
            n_segments = bounds.size - 1
            segment_groups = scratch["segment_groups"][:bounds.size]
            segment_groups.copy_to_device(bounds, stream=stream)
            normal_segment_kernel[launch_blocks(n_segments), THREADS_PER_BLOCK, stream](
                v["intensity"], v["weight"], v["g"], v["deriv"], free_col, v["group_start"],
                segment_groups, scratch["local_of_col"], scratch["cols"], scratch["dih"],
                scratch["jrow"], scratch["phi_partial"], scratch["rhs_partial"],
                scratch["normal_partial"])
            flat = scratch["normal_partial"][:n_segments].reshape(n_segments, p * p)
            ordered_segment_sum_kernel[launch_blocks(p * p), THREADS_PER_BLOCK, stream](
                flat, scratch["normal"])
            scratch["phi_partial"][:n_segments].copy_to_host(
                scratch["phi_host"][:n_segments], stream=stream)
            scratch["rhs_partial"][:n_segments].copy_to_host(
                scratch["rhs_host"][:n_segments], stream=stream)
            scratch["normal"].copy_to_host(scratch["normal_host"], stream=stream)
            pending[k] = n_segments
            if n_streams > 1 and k == n_streams - 1:
                collect((k + 1) % n_streams)  # keep batch order: the older stream first
        for j in range(n_streams):  # the last batches, oldest first
            collect((len(self.batches) + j) % n_streams)
        return (math.fsum(phi_parts), rhs[:self.n_par],
                normal[:self.n_par, :self.n_par])
