"""compute.device=cuda: g and var(g) of every suitable reflection after a scaling round.

Twin of ScalingRun.expand (scaling/algorithm.py): the models are evaluated at all suitable
rows of every dataset by the device model kernels of the scaling target
(kernels.cuda.models: the KB family and the fused physical layout; kernels.cuda.array: the
array model's smoothed grids), and var(g) = d^T C d by kernels.cuda.models
.variance_of_g_kernel over the same dg/dp. The rows go in chunks of whole datasets' rows
(EXPAND_CHUNK_ROWS), so no (n, K) table of all reflections exists on the host or the device;
per chunk the model's per-row inputs go up (once per job: they stay in the job table,
backends.cuda_job_table, while half the device memory stays free) and g (and var(g)) come
back; g of every row also stays on the device for the next outlier rejection. In a job whose
scaling layout is streamed from the host, chunks of the streamed batch size, nothing kept.

Jobs of several model families (backends.cuda_mixed_models): each family's kernel on its
rows of the chunk, scattered into the chunk's g and dg/dp; resident, the chunk's rows split
by family on the device and gathered from each family's resident job-order inputs. A model
without a device kernel returns False and the caller expands on the CPU.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..kernels.cuda import array as device_array_model
from ..kernels.cuda import models as device_models

# Rows per device chunk: the chunk's model inputs are built on the host (~350 B per row with
# absorption), so 1M rows keep that transient near the CPU run's own; on the device that is
# ~0.5 GB of dg/dp and columns, and enough threads to fill a GPU.
EXPAND_CHUNK_ROWS = 1 << 20


def device_model_kind(models):
    """'kb', 'physical', 'array' or None: which device kernel evaluates these models."""
    from ..scaling.family import KBFamily
    from ..scaling.physical_pass import uses_fused_physical_pass

    from .cuda_mixed_models import applies as mixed_applies

    if KBFamily.applies(models):
        return "kb"
    if uses_fused_physical_pass(models):
        return "physical"
    if mixed_applies(models):
        return "mixed"  # several families (backends.cuda_mixed_models)
    return "array"  # if array_layout accepts them (checked per chunk)


class _Chunk:
    """The device inputs of one chunk of rows: evaluate() -> (g, deriv, free columns) on the
    device (deriv and columns None when only g is wanted)."""

    def __init__(self, kind, manager, dataset_id, loc_index, put, put_parameters):
        """put(name, array): the per-row input on the device (the job table's copy when the
        same content is resident); put_parameters(array): a per-call upload."""
        self.kind = kind
        self.put_parameters = put_parameters

        def placeholder(array, dtype=np.float64, ndim=1, name=None):
            if array is None:
                return put_parameters(np.zeros((1,) * ndim, dtype=dtype)), False
            return put(name, np.ascontiguousarray(array, dtype=dtype)), True

        self.n = int(dataset_id.size)
        models = manager.models
        if kind == "kb":
            from ..scaling.family import KBFamily

            fam = KBFamily(models, manager.column_of_parameter, dataset_id, loc_index)
            self.scale, self.decay = fam.parameters(manager.get_free())
            self.row_dataset = put("row_dataset", fam.row_dataset)
            self.inv_two_d_sq = put("inv_two_d_sq", np.ascontiguousarray(fam.inv_two_d_sq))
            self.fixed, self.has_fixed = placeholder(fam.fixed_factor, name="fixed")
            self.cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col,
                                                        fam.decay_col)
        elif kind == "physical":
            from ..scaling.physical_pass import PhysicalPassInputs

            zeros = np.zeros(self.n)
            f = PhysicalPassInputs(models, dataset_id, loc_index, zeros, zeros)
            n_abs = (0 if f.absorption_coefficients is None
                     else f.absorption_coefficients.shape[1])
            full_cols = device_models.physical_columns(f.first_param, f.absorption_first,
                                                       n_abs)
            guard = np.full(f.full_parameters().size - f.n_full, -1, np.int64)
            full_to_free = np.concatenate([manager.full_to_free(), guard])
            self.cols = full_to_free[full_cols]
            self.parameters = f.full_parameters()
            self.record = put("record", np.ascontiguousarray(f.record))
            self.first_param = put("first_param", np.ascontiguousarray(f.first_param))
            self.abs, self.has_abs = placeholder(f.absorption_coefficients, ndim=2,
                                                 name="absorption")
            self.abs_first, _ = placeholder(f.absorption_first, np.int32, name="absorption_first")
            self.fixed, self.has_fixed = placeholder(f.fixed_factor, name="fixed")
        else:
            from .cuda_scaling import array_layout

            layout = array_layout(models, dataset_id, loc_index, manager.column_of_parameter)
            if layout is None:
                raise _NoDeviceModel
            self.cols = layout["free_col"]
            self.parameters = np.concatenate(
                [np.asarray(m.parameter_vector(), dtype=np.float64) for m in models]
                + [np.ones(1)])
            self.weights = put("weights", layout["weights"])
            self.full_index = put("full_index", layout["full_index"])
            self.component_start = put_parameters(layout["component_start"])
            self.fixed, self.has_fixed = placeholder(layout["fixed_factor"], name="fixed")

    def evaluate(self, with_derivatives):
        n = self.n
        blocks, tpb = device_models.blocks(n), device_models.THREADS_PER_BLOCK
        g = cuda.device_array(n)
        deriv = cuda.device_array((n, self.cols.shape[1])) if with_derivatives else None
        if self.kind == "kb":
            scale, decay = self.put_parameters(self.scale), self.put_parameters(self.decay)
            if with_derivatives:
                device_models.kb_family_kernel[blocks, tpb](
                    self.row_dataset, self.inv_two_d_sq, self.fixed, self.has_fixed, scale,
                    decay, g, deriv)
            else:
                device_models.kb_family_g_kernel[blocks, tpb](
                    self.row_dataset, self.inv_two_d_sq, self.fixed, self.has_fixed, scale,
                    decay, g)
        elif self.kind == "physical":
            parameters = self.put_parameters(self.parameters)
            args = (self.record, self.first_param, self.abs, self.abs_first, self.has_abs,
                    self.fixed, self.has_fixed, parameters, g)
            if with_derivatives:
                device_models.physical_model_kernel[blocks, tpb](*args, deriv)
            else:
                device_models.physical_g_kernel[blocks, tpb](*args)
        else:
            parameters = self.put_parameters(self.parameters)
            args = (self.weights, self.full_index, self.component_start, self.fixed,
                    self.has_fixed, parameters, g)
            if with_derivatives:
                device_array_model.array_model_kernel[blocks, tpb](*args, deriv)
            else:
                device_array_model.array_g_kernel[blocks, tpb](*args)
        return g, deriv


class _ResidentChunk(_Chunk):
    """A chunk of consecutive job rows [lo, hi) read from the job's resident per-row inputs
    (backends.cuda_resident_inputs.job_inputs, the scaling rounds' own copy): nothing with
    a row per observation goes up, and the ELL columns (var(g)'s) are made on the device
    from the inputs and a parameter-sized free-column map."""

    def __init__(self, kind, manager, job, lo, hi, put_parameters):
        from ..kernels.cuda import resident_rows as rr

        self.kind, self.put_parameters = kind, put_parameters
        self.n = n = hi - lo
        models = manager.models
        tpb = device_models.THREADS_PER_BLOCK

        def optional(name, dtype=np.float64, ndim=1):
            if job.get(name) is None:
                return put_parameters(np.zeros((1,) * ndim, dtype=dtype)), False
            return job[name][lo:hi], True

        self.fixed, self.has_fixed = optional("fixed")
        if kind == "kb":
            from ..scaling.family import KBFamily

            empty = np.zeros(0, np.int64)  # the per-dataset K, B and columns only
            fam = KBFamily(models, manager.column_of_parameter, empty, empty)
            self.scale, self.decay = fam.parameters(manager.get_free())
            self.row_dataset = job["row_dataset"][lo:hi]
            self.inv_two_d_sq = job["inv_two_d_sq"][lo:hi]
            self.cols = cuda.device_array((max(n, 1), 2), np.int32)[:n]
            if n:
                rr.kb_columns_kernel[device_models.blocks(n), tpb](
                    self.row_dataset, put_parameters(fam.scale_col),
                    put_parameters(fam.decay_col), self.cols)
        elif kind == "physical":
            from ..scaling.physical_pass import GUARD

            self.parameters = np.concatenate(
                [np.asarray(m.parameter_vector(), dtype=np.float64) for m in models] + [GUARD])
            self.record = job["record"][lo:hi]
            self.first_param = job["first_param"][lo:hi]
            self.abs, self.has_abs = optional("absorption", ndim=2)
            self.abs_first, _ = optional("absorption_first", np.int32)
            n_abs = 0 if job.get("absorption") is None else int(job["absorption"].shape[1])
            full_cols = cuda.device_array((max(n, 1), 6 + n_abs), np.int64)[:n]
            self.cols = cuda.device_array((max(n, 1), 6 + n_abs), np.int64)[:n]
            if n:
                rr.physical_columns_kernel[device_models.blocks(n), tpb](
                    self.first_param, self.abs_first, self.has_abs, full_cols)
                free_of_full = np.concatenate([manager.full_to_free(),
                                               np.full(GUARD.size, -1, np.int64)])
                rr.map_columns_kernel[device_models.blocks(n), tpb](
                    full_cols, put_parameters(np.ascontiguousarray(free_of_full, np.int64)),
                    self.cols)
        else:
            self.parameters = np.concatenate(
                [np.asarray(m.parameter_vector(), dtype=np.float64) for m in models]
                + [np.ones(1)])
            self.weights = job["weights"][lo:hi]
            self.full_index = job["full_index"][lo:hi]
            self.component_start = put_parameters(job["component_start"])
            column_map = np.concatenate([np.asarray(c, dtype=np.int32)
                                         for c in manager.column_of_parameter]
                                        + [np.full(1, -1, np.int32)])
            self.cols = cuda.device_array((max(n, 1), self.weights.shape[1]), np.int32)[:n]
            if n:
                rr.map_columns_kernel[device_models.blocks(n), tpb](
                    self.full_index, put_parameters(column_map), self.cols)


class _MixedChunk:
    """A chunk of a job of several model families (backends.cuda_mixed_models): each
    family's kernel on its rows of the chunk, scattered into the chunk's g and dg/dp.
    Resident: the chunk's consecutive job rows split by family on the device and each
    family's inputs gathered from its resident job-order inputs (nothing with a row per
    observation goes up); else the chunk's per-family inputs built on the host and put."""

    def __init__(self, manager, put_parameters, n, job=None, offsets=None, lo=0,
                 dataset_id=None, loc_index=None, put=None, store=None):
        from . import cuda_mixed_models as mm
        from ..kernels.cuda import families as kf

        self.n, self.manager = int(n), manager
        if job is not None:
            order = cuda.device_array(max(self.n, 1), np.int64)[:self.n]
            if self.n:
                kf.arange_kernel[device_models.blocks(self.n),
                                 device_models.THREADS_PER_BLOCK](lo, order)
            self.mixed = mm.resident_families(store, manager, job, offsets, order)
            self.cols = self.mixed.cols  # on the device
        else:
            layout = mm.HostMixedLayout(manager, mm.family_plan(manager.models), dataset_id,
                                        loc_index)
            if not layout.ok:
                raise _NoDeviceModel
            self.mixed = mm.device_from_host(layout, manager, put, put_parameters)
            self.cols = layout.cols  # on the host (put by the caller for var(g))

    def evaluate(self, with_derivatives):
        n = self.n
        g = cuda.device_array(max(n, 1))[:n]
        deriv = None
        if with_derivatives:
            deriv = cuda.device_array((max(n, 1), self.mixed.width))[:n]
            self.mixed.prepare(deriv)
        self.mixed.evaluate(self.manager.get_free(), g, deriv)
        return g, deriv


class _NoDeviceModel(Exception):
    pass


def _chunks(sizes, chunk_rows):
    """(dataset_id, loc_index, [(dataset, first row, rows)]) per chunk of at most
    chunk_rows rows (a larger dataset is split)."""
    current, count = [], 0
    for d, n in enumerate(sizes):
        start = 0
        while start < n:
            take = min(n - start, chunk_rows - count)
            current.append((d, start, take))
            count += take
            start += take
            if count == chunk_rows:
                yield current
                current, count = [], 0
    if current:
        yield current


def expand_on_device(states, manager, covariance=None, chunk_rows=EXPAND_CHUNK_ROWS):
    """g (and var(g) with a covariance) of every state's suitable rows on the device, into
    state.g / state.var_g. False (nothing changed) when the models have no device kernel.

    The model's per-row inputs of each chunk stay in the job's device table
    (backends.cuda_job_table) and go up again only when their content changes; the g of all
    rows stays there too (adopted as the job's "g"), so the next outlier rejection finds it
    resident."""
    from .cuda_job_table import current_job_table

    store = current_job_table()
    stream_rows = getattr(store, "stream_rows", None)
    with store.counting("expansion"):
        store.begin_call()
        if stream_rows is not None:
            # the job's layout is streamed from the host (larger than device memory): chunks
            # of the streamed batch size, each chunk's inputs copied up and let go
            return _expand(store, states, manager, covariance,
                           max(1, min(int(chunk_rows), int(stream_rows))), resident=False)
        return _expand(store, states, manager, covariance, chunk_rows)


def _expand(store, states, manager, covariance, chunk_rows, resident=True):
    from .cuda_job_table import room_to_keep
    kind = device_model_kind(manager.models)
    sizes = [int(s.suitable_rows.size) for s in states]
    g_out = [np.empty(n) for n in sizes]
    var_out = [np.empty(n) for n in sizes] if covariance is not None else None
    cov = (store.put(np.ascontiguousarray(covariance, dtype=np.float64))
           if covariance is not None else None)
    g_all = cuda.device_array(max(sum(sizes), 1)) if resident else None
    at_all = 0
    job = None
    if resident:
        # the scaling rounds' job-order per-row inputs (uploaded once per job), when they
        # are or can be resident: chunks are slices of them
        from .cuda_resident_inputs import job_inputs

        job = job_inputs(store, kind, manager, np.concatenate([[0], np.cumsum(sizes)]))
    job_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    try:
        for number, pieces in enumerate(_chunks(sizes, max(int(chunk_rows), 1))):
            dataset_id = np.concatenate([np.full(n, d, np.int64) for d, _, n in pieces])
            loc_index = np.concatenate([np.arange(s, s + n, dtype=np.int64)
                                        for _, s, n in pieces])

            def put(name, array, number=number):
                role = f"expansion {number}:{name}"
                if not resident or (role not in store._entries
                                    and not room_to_keep(array.nbytes)):
                    # streamed job, or no room to keep it: copied for this call only
                    return store.put(array, "observations", f"expansion:{name}")
                return store.content(role, array)

            if kind == "mixed":
                chunk = _MixedChunk(manager, store.put, dataset_id.size, job=job,
                                    offsets=job_offsets, lo=at_all, dataset_id=dataset_id,
                                    loc_index=loc_index, put=put, store=store)
            elif job is not None:
                chunk = _ResidentChunk(kind, manager, job, at_all, at_all + dataset_id.size,
                                       store.put)
            else:
                chunk = _Chunk(kind, manager, dataset_id, loc_index, put, store.put)
            g, deriv = chunk.evaluate(covariance is not None)
            if resident:  # the chunks are consecutive job rows: g of all rows stays
                g_all[at_all:at_all + chunk.n].copy_to_device(g)
            at_all += chunk.n
            g_host = g.copy_to_host()
            var_host = None
            if covariance is not None:
                var = cuda.device_array(chunk.n)
                cols = (chunk.cols if job is not None else
                        put("cols", np.ascontiguousarray(chunk.cols, np.int64)))
                device_models.variance_of_g_kernel[device_models.blocks(chunk.n),
                                                   device_models.THREADS_PER_BLOCK](
                    deriv, cols, cov, var)
                var_host = var.copy_to_host()
            at = 0
            for d, s, n in pieces:
                g_out[d][s:s + n] = g_host[at:at + n]
                if var_host is not None:
                    var_out[d][s:s + n] = var_host[at:at + n]
                at += n
    except _NoDeviceModel:
        return False
    for d, state in enumerate(states):
        state.g = g_out[d]
        if var_out is not None:
            state.var_g = var_out[d]
    if resident:
        store.adopt("g", [state.g for state in states], g_all[:at_all])
    return True
