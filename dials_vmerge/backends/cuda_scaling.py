"""compute.device=cuda: the scaling target of one minimisation evaluated on the GPU.

CudaScalingTarget is a ScalingTarget whose value_and_gradient runs on the device: the
observation arrays of the minimisation table (I, w, group offsets, the model's per-row
inputs and the gradient's column entries) are copied once, when the target is built for a
scaling round, and stay there; each call uploads the parameters (K, B per dataset, or the
full physical vector) and brings back Phi and the gradient. The minimiser stays on the host.

Model families on the device: the KB family (kernels.cuda.models.kb_family_kernel), the
fused physical layout (physical_model_kernel) and the array model's smoothed grids
(kernels.cuda.array.array_model_kernel, layout from array_layout below). A job of several
model families (KB stills with physical sweeps, physical models with different absorption
terms, array models among others) runs each family's kernel on its rows and scatters g and
dg/dp into one table (backends.cuda_mixed_models, kind "mixed"). Only a model without a
device kernel evaluates its ELL Jacobian on the host and uploads
g and dg/dp per call; the target sums still run on the device. The normal equations of the
full-matrix round run on the device too (kernels.cuda.normal), over the free columns of the
same g and dg/dp.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from dials_vmerge.kernels.cuda import array as device_array_model
from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.kernels.cuda.normal import DeviceNormalEquations
from dials_vmerge.backends import cuda_streamed_scaling as streamed_target
from dials_vmerge.kernels.cuda.target import DeviceTarget
from dials_vmerge.backends import mpi_world
from dials_vmerge.backends.block_sums import blockwise_sum
from dials_vmerge.scaling.target import ScalingTarget

def array_layout(models, dataset_id, loc_index, column_of_parameter):
    """The device layout of array models (kernels.cuda.array), or None when some dataset's
    model has a component that is not a smoothed grid or the analytical correction.

    Returns a dict: weights (n, K), full_index (n, K) int64 into every model's parameters
    concatenated plus a guard entry (= 1, at n_full), free_col (n, K) int32 (-1: fixed,
    guard), component_start (C + 1), fixed_factor (n,) or None, n_full.
    """
    from ..kernels.flat import split_positions
    from ..model.array_grid import _Grid
    from ..model.component import AnalyticalComponent

    names, widths = [], {}
    for model in models:
        for name, comp in model.components.items():
            if isinstance(comp, AnalyticalComponent):
                continue
            if not isinstance(comp, _Grid) or comp._smoother is None:
                return None
            if name not in widths:
                names.append(name)
                widths[name] = 0
            widths[name] = max(widths[name], int(comp.n_deriv_columns))
    if not names or len(names) > device_array_model.MAX_COMPONENTS:
        return None
    component_start = np.concatenate([[0], np.cumsum([widths[n] for n in names])]).astype(
        np.int64)
    offsets = np.concatenate([[0], np.cumsum([m.n_parameters for m in models])]).astype(
        np.int64)
    n_full = int(offsets[-1])
    n, n_slots = int(dataset_id.size), int(component_start[-1])
    weights = np.zeros((n, n_slots))
    full_index = np.full((n, n_slots), n_full, dtype=np.int64)  # the guard: weight 0 or 1
    free_col = np.full((n, n_slots), -1, dtype=np.int32)
    fixed_factor = None
    for d, obs in enumerate(split_positions(dataset_id, len(models))):
        model, rows = models[d], np.asarray(loc_index)[obs]
        slices = model.parameter_slices()
        present = set()
        for name, comp in model.components.items():
            if isinstance(comp, AnalyticalComponent):
                if fixed_factor is None:
                    fixed_factor = np.ones(n)
                fixed_factor[obs] *= comp.values(rows=rows)
                continue
            lo = int(component_start[names.index(name)])
            w, idx = comp._smoother.ell(rows)
            local = np.asarray(idx, dtype=np.int64) + slices[name].start
            weights[obs, lo:lo + w.shape[1]] = w
            full_index[obs, lo:lo + w.shape[1]] = local + offsets[d]
            free_col[obs, lo:lo + w.shape[1]] = np.asarray(column_of_parameter[d])[local]
            present.add(name)
        for c, name in enumerate(names):
            if name not in present:  # value 1: weight 1 on the guard
                weights[obs, component_start[c]] = 1.0
    return {"weights": weights, "full_index": full_index, "free_col": free_col,
            "component_start": component_start, "fixed_factor": fixed_factor,
            "n_full": n_full}


def _rank_key_bounds(key_blocks):
    """The group offsets of this MPI rank's key blocks (blocks [lo, hi) of the job's
    read-time partition: hi - lo + 1 offsets, empty blocks included), or None outside a
    program's scaling job."""
    if key_blocks is None:
        return None
    block_bounds, rank_blocks = key_blocks
    rank = mpi_world.rank()
    lo, hi = int(rank_blocks[rank]), int(rank_blocks[rank + 1])
    return np.asarray(block_bounds[lo:hi + 1], dtype=np.int64)


class CudaScalingTarget(ScalingTarget):
    def __init__(self, manager, ih_table, nproc=1, batch_size=None, host_resident=None,
                 device_memory_limit=None, device_columns=None):
        """device_columns(): (intensity, weight) of ih_table gathered on the device from the
        job's resident arrays (backends.cuda_job_table.minimisation_columns), or None: then
        they are uploaded."""
        super().__init__(manager, ih_table, nproc)
        from .cuda_job_table import current_job_table

        # the round's copies are counted in the job table (pass "scaling target"): the
        # minimisation table of each round goes up once, then only parameters per call
        self._store = current_job_table()
        with self._store.counting("scaling target"):
            self._store.begin_call()
        t = ih_table
        n = t.n_obs
        self._n = n
        self.host_resident = False
        self._host_sums = False
        # issue 11: in a program's scaling job the sums run per key block of this MPI rank
        # (the job's read-time blocks, the same for any number of ranks) and are added as
        # block_sums' tree over all ranks: the same bits for N = 1, 2, 3 ranks
        self._key_bounds = _rank_key_bounds(self.key_blocks)
        streamed = False
        if host_resident is not False and n:
            # a layout larger than free device memory (or a forced one): streamed per batch
            # (every model kind: KB, physical, array, host-evaluated)
            streamed = streamed_target.stream_layout(self, host_resident, batch_size,
                                                     device_memory_limit)
        if self._key_bounds is not None and mpi_world.n_ranks() > 1:
            # the streamed batches are not key blocks: when any rank streams, every rank
            # adds its blocks on the host (ScalingTarget's kernels), not on the device
            from . import rank_local

            if rank_local.any_rank(streamed):
                self._host_sums, self.host_resident = True, False
                self._kind, self._device_target = "host sums (a rank streamed)", None
                return
        if streamed:
            # one rank (or one process) streaming: the streamed batches' own sums
            self._key_bounds = None
            return
        # the round's table on the device from the job's resident columns
        # (backends.cuda_resident_inputs), or its I and weights alone, or None (uploaded):
        # asked for once, by the first device model that wants it
        self._device_columns, self._columns_asked = device_columns, False
        self._columns = None
        inputs = None
        if self.fused is not None:
            f = self.fused
            self._kind = "physical"
            n_abs = 0 if f.absorption_coefficients is None else f.absorption_coefficients.shape[1]
            cols = device_models.physical_columns(f.first_param, f.absorption_first, n_abs)
            self._n_params = f.n_full + 5  # the guard's columns are computed and dropped
            inputs = self._resident_inputs("physical")
            if inputs is not None:
                self._record, self._first_param = inputs["record"], inputs["first_param"]
                self._abs, self._has_abs = inputs["abs"], inputs["has_abs"]
                self._abs_first = inputs["abs_first"]
                self._fixed, self._has_fixed = inputs["fixed"], inputs["has_fixed"]
            else:
                self._record = self._upload(f.record)
                self._first_param = self._upload(f.first_param)
                self._abs, self._has_abs = self._placeholder(f.absorption_coefficients, ndim=2)
                self._abs_first, _ = self._placeholder(f.absorption_first, np.int32)
                self._fixed, self._has_fixed = self._placeholder(f.fixed_factor)
        elif self.family is not None:
            fam = self.family
            self._kind = "kb"
            cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col,
                                                   fam.decay_col)
            self._n_params = self.n_par
            inputs = self._resident_inputs("kb", fam)
            if inputs is not None:
                self._row_dataset = inputs["row_dataset"]
                self._inv_two_d_sq = inputs["inv_two_d_sq"]
                self._fixed, self._has_fixed = inputs["fixed"], inputs["has_fixed"]
            else:
                self._row_dataset = self._upload(fam.row_dataset)
                self._inv_two_d_sq = self._upload(fam.inv_two_d_sq)
                self._fixed, self._has_fixed = self._placeholder(fam.fixed_factor)
        else:
            layout = getattr(self, "_array_layout", None)  # from stream_layout's check
            if layout is None and n:
                layout = array_layout(manager.models, t.dataset_id, t.loc_index,
                                      manager.column_of_parameter)
            if layout is not None:
                self._kind = "array"
                cols = layout["free_col"]
                self._n_params = self.n_par
                inputs = self._resident_inputs("array")
                if inputs is not None:
                    self._weights, self._full_index = inputs["weights"], inputs["full_index"]
                    self._component_start = inputs["component_start"]
                    self._fixed, self._has_fixed = inputs["fixed"], inputs["has_fixed"]
                else:
                    self._weights = self._upload(layout["weights"])
                    self._full_index = self._upload(layout["full_index"])
                    self._component_start = self._upload(layout["component_start"],
                                                         "parameters")
                    self._fixed, self._has_fixed = self._placeholder(layout["fixed_factor"])
            else:
                self._mixed = None
                mixed_host = self._mixed_layout() if n else None
                if mixed_host is not None:
                    # several model families: each family's device kernel on its rows
                    # (backends.cuda_mixed_models), free ELL columns
                    from . import cuda_mixed_models as mixed_models

                    self._kind = "mixed"
                    cols = mixed_host.cols
                    self._n_params = self.n_par
                    inputs = self._resident_inputs("mixed", mixed_host)
                    if inputs is not None:
                        self._mixed = inputs["mixed"]
                    else:
                        def put(name, array):
                            return self._upload(array)

                        self._mixed = mixed_models.device_from_host(
                            mixed_host, manager, put,
                            lambda a: self._upload(a, "parameters"))
                else:
                    self._kind = "host-model"
                    self._n_params = self.n_par
                    cols = None
        self._g = cuda.device_array(max(n, 1))
        # host ELL columns (the shadow checks and var(g) read them); the device's own copy
        # (device_cols) is made on the device when the table is resident
        self._cols = cols
        self._device_cols = None if inputs is None else inputs["cols"]
        self._batch_size = batch_size
        self._device_target = None
        if cols is not None:
            self._deriv = cuda.device_array((max(n, 1), cols.shape[1]))
            if self._kind == "mixed":
                self._mixed.prepare(self._deriv[:n])
            columns = self._table_columns()
            resident = columns if hasattr(columns, "model_inputs") else None
            if resident is not None:
                columns = (resident.intensity, resident.weight)
            with self._store.counting("scaling target"):
                self._device_target = DeviceTarget(
                    t.intensity, t.weight, t.group_start, cols, self._n_params, batch_size,
                    self._upload, columns,
                    device_group_start=None if inputs is None else resident.group_start,
                    device_cols=self._device_cols, group_bounds=self._key_bounds)

    def _mixed_layout(self):
        """The host's per-family inputs of the table (backends.cuda_mixed_models), or None
        when the models are not several device families (or one family's layout fails)."""
        from . import cuda_mixed_models as mixed_models

        layout = getattr(self, "_mixed_host", None)  # from stream_layout's check
        if layout is not None:
            return layout
        models = self.manager.models
        if not mixed_models.applies(models):
            return None
        t = self.table
        layout = mixed_models.HostMixedLayout(self.manager, mixed_models.family_plan(models),
                                              t.dataset_id, t.loc_index)
        return layout if layout.ok else None

    def _table_columns(self):
        """device_columns() of the constructor, called once (counted in this round)."""
        if not self._columns_asked and self._device_columns is not None:
            self._columns_asked = True
            with self._store.counting("scaling target"):
                self._columns = self._device_columns()
        return self._columns

    def _resident_inputs(self, kind, family=None):
        """The model's device inputs gathered from the job's resident columns (None: the
        table's are uploaded)."""
        resident = self._table_columns() if self._n else None
        if not hasattr(resident, "model_inputs"):
            return None
        with self._store.counting("scaling target"):
            return resident.model_inputs(kind, self.manager, family)

    def _upload(self, array, kind="observations"):
        """The device copy of array, counted in the job table's pass "scaling target"."""
        # the table's index arrays (group offsets, ELL entries, parameter indices) apart
        # from its values (the model's per-row inputs)
        role = None
        if kind == "observations":
            role = ("minimisation table (indices)" if np.asarray(array).dtype.kind in "iub"
                    else "minimisation table (model values)")
        with self._store.counting("scaling target"):
            return self._store.put(array, kind, role)

    def _placeholder(self, array, dtype=np.float64, ndim=1):
        """(device array, flag) as kernels.cuda.models.placeholder, counted."""
        if array is None:
            return self._upload(np.zeros((1,) * ndim, dtype=dtype), "parameters"), False
        return self._upload(np.ascontiguousarray(array, dtype=dtype)), True

    @property
    def kind(self):
        return self._kind

    def _device_model(self, x):
        """g and dg/dp of every observation into the device buffers."""
        n = self._n
        blocks = device_models.blocks(n)
        tpb = device_models.THREADS_PER_BLOCK
        if self._kind == "kb":
            scale, decay = self.family.parameters(x)
            device_models.kb_family_kernel[blocks, tpb](
                self._row_dataset, self._inv_two_d_sq, self._fixed, self._has_fixed,
                self._upload(scale, "parameters"), self._upload(decay, "parameters"),
                self._g[:n], self._deriv[:n])
        elif self._kind == "mixed":
            self.manager.set_free(x)
            with self._store.counting("scaling target"):  # each family's parameters go up
                self._mixed.evaluate(x, self._g[:n], self._deriv[:n])
        elif self._kind == "array":
            self.manager.set_free(x)
            parameters = np.concatenate(
                [np.asarray(m.parameter_vector(), dtype=np.float64)
                 for m in self.manager.models] + [np.ones(1)])
            device_array_model.array_model_kernel[blocks, tpb](
                self._weights, self._full_index, self._component_start, self._fixed,
                self._has_fixed, self._upload(parameters, "parameters"), self._g[:n],
                self._deriv[:n])
        else:
            self.manager.set_free(x)
            parameters = self.fused.full_parameters()
            device_models.physical_model_kernel[blocks, tpb](
                self._record, self._first_param, self._abs, self._abs_first, self._has_abs,
                self._fixed, self._has_fixed, self._upload(parameters, "parameters"), self._g[:n],
                self._deriv[:n])

    def _key_block_total(self, partials):
        """The totals of per-key-block partials (one leading row per block of this rank) over
        all ranks: block_sums' pairwise tree over the block index."""
        block_bounds, rank_blocks = self.key_blocks

        def evaluate(chunks):
            return [p[:chunks.size - 1] for p in partials]

        return blockwise_sum(self.table.group_start, evaluate,
                             max(len(self._key_bounds) - 1, 1), block_bounds,
                             rank_blocks=rank_blocks)

    def _key_block_target(self, x):
        """(Phi, gradient over the target's columns) of the key-block sums."""
        n_blocks = len(self._key_bounds) - 1
        if self._n == 0:
            partials = [np.zeros(n_blocks), np.zeros((n_blocks, self._n_params))]
        elif self._kind == "host-model":
            g, values, cols = self._ell(x)
            if self._device_target is None or not np.array_equal(cols, self._cols):
                self._cols = cols
                self._device_target = DeviceTarget(
                    self.table.intensity, self.table.weight, self.table.group_start, cols,
                    self.n_par, self._batch_size, self._upload,
                    group_bounds=self._key_bounds)
            with self._store.counting("scaling target"):
                self._store._count("observations", g.nbytes + values.nbytes, "host-model g")
            self._g[:self._n].copy_to_device(np.ascontiguousarray(g, dtype=np.float64))
            partials = list(self._device_target.evaluate_partials(
                self._g[:self._n], cuda.to_device(np.ascontiguousarray(values,
                                                                       dtype=np.float64))))
        else:
            self._device_model(x)
            partials = list(self._device_target.evaluate_partials(self._g[:self._n],
                                                                  self._deriv[:self._n]))
        phi, grad_cols = self._key_block_total(partials)
        return float(phi), grad_cols

    def value_and_gradient(self, x):
        t = self.table
        if self._host_sums:
            return ScalingTarget.value_and_gradient(self, x)
        if self._key_bounds is not None:
            phi, grad_cols = self._key_block_target(x)
            grad = self._free_gradient(grad_cols)
        elif self._kind == "host-model" and not self.host_resident:
            g, values, cols = self._ell(x)
            if self._device_target is None or not np.array_equal(cols, self._cols):
                self._cols = cols
                self._device_target = DeviceTarget(t.intensity, t.weight, t.group_start,
                                                   cols, self.n_par, self._batch_size,
                                                   self._upload)
            n = self._n
            g = np.ascontiguousarray(g, dtype=np.float64)
            values = np.ascontiguousarray(values, dtype=np.float64)
            with self._store.counting("scaling target"):  # a host model: g, dg/dp per call
                self._store._count("observations", g.nbytes + values.nbytes, "host-model g")
            if len(self._device_target.batches) > 1:
                # each batch's g and dg/dp go up on its stream, overlapping the batch before
                if getattr(self, "_host_deriv", None) is None or \
                        self._host_deriv.shape != values.shape:
                    self._host_deriv = cuda.device_array(values.shape)
                phi, grad = self._device_target.evaluate(self._g[:n], self._host_deriv, g,
                                                         values)
            else:
                self._g[:n].copy_to_device(g)
                phi, grad = self._device_target.evaluate(self._g[:n],
                                                         cuda.to_device(values))
        elif self._n == 0:
            phi, grad = 0.0, np.zeros(self.n_par)
        else:
            if self.host_resident:
                phi, grad_cols = streamed_target.evaluate(self, x)
            else:
                self._device_model(x)
                phi, grad_cols = self._device_target.evaluate(self._g[:self._n],
                                                              self._deriv[:self._n])
            grad = self._free_gradient(grad_cols)
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        grad = grad + 2.0 * wr * x
        self.last_phi = phi
        return phi, grad

    def _free_gradient(self, grad_cols):
        """The gradient in the free parameters from the device's per-column gradient (the
        physical model's full entries mapped as the CPU path: fixed order, shared components
        add up)."""
        if self._kind != "physical":
            return grad_cols
        grad = np.zeros(self.n_par)
        np.add.at(grad, self.full_to_free[self.free_entries],
                  grad_cols[:self.fused.n_full][self.free_entries])
        return grad

    def normal_free_columns(self):
        """The ELL columns of the device dg/dp in the free vector (-1: fixed or guard)."""
        if self._kind == "physical":
            full_to_free = np.concatenate([self.full_to_free, np.full(5, -1, np.int64)])
            return full_to_free[self._cols]
        return self._cols

    def normal_equations(self, x):
        """(phi, b, N) with b = J^T W r + wr p and N = J^T W J + diag(wr), on the device."""
        if self._host_sums or (self._kind == "host-model" and not self.host_resident):
            return super().normal_equations(x)
        if self._key_bounds is not None:
            phi, rhs, normal = self._key_block_normal_equations(x)
        elif self._n == 0:
            return super().normal_equations(x)
        elif self.host_resident:
            # a layout larger than device memory: over the streamed batches
            phi, rhs, normal = streamed_target.normal_equations(self, x)
        else:
            phi, rhs, normal = self._resident_normal_equations(x)
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        rhs = rhs + wr * x
        normal = normal + np.diag(wr)
        return phi, rhs, normal

    def _key_block_normal_equations(self, x):
        """(phi, J^T W r, J^T W J) of the data term from a device segment per key block of
        this rank, added as block_sums' tree over all ranks."""
        n_blocks, p = len(self._key_bounds) - 1, self.n_par
        if self._n == 0:
            partials = [np.zeros(n_blocks), np.zeros((n_blocks, p)), np.zeros((n_blocks, p, p))]
        else:
            self._resident_normal_equations(x, evaluate=False)
            partials = list(self._normal.evaluate_partials(self._g[:self._n],
                                                           self._deriv[:self._n]))
        phi, rhs, normal = self._key_block_total(partials)
        return float(phi), rhs, normal

    def _resident_normal_equations(self, x, evaluate=True):
        if getattr(self, "_normal", None) is None:
            gs = np.ascontiguousarray(self.table.group_start, dtype=np.int64)
            dt = self._device_target
            if self._device_cols is not None:
                # group offsets and free columns already on the device (resident table)
                resident = self._columns
                device_gs = resident.group_start
                if self._kind == "physical":
                    with self._store.counting("scaling target"):
                        free_cols = resident.map_columns(self._device_cols, np.concatenate(
                            [self.full_to_free, np.full(5, -1, np.int64)]))
                else:
                    free_cols = self._device_cols
            else:
                device_gs, free_cols = self._upload(gs), self.normal_free_columns()
            self._normal = DeviceNormalEquations(dt.intensity, dt.weight, gs, device_gs,
                                                 free_cols, self.n_par,
                                                 upload=self._upload,
                                                 segment_bounds=self._key_bounds)
        self._device_model(x)
        if not evaluate:  # g and dg/dp at x are on the device
            return None
        return self._normal.evaluate(self._g[:self._n], self._deriv[:self._n])
