"""compute.device=cuda: g and dg/dp on the device for jobs whose datasets form several model
families (scaling/family.py's family_key: KB stills and physical sweeps in one job, physical
models with and without absorption, array models), or one smooth-rotation family whose
models differ in their components (the fused single-layout pass then does not apply).

Per family the device kernel of its kind runs over the family's rows only (KB:
kernels.cuda.models.kb_family_kernel; physical and dose_decay:
physical_model_kernel on PhysicalPassInputs of the family's models; array:
kernels.cuda.array.array_model_kernel on cuda_scaling.array_layout of its models) into
family-sized buffers, and a scatter (kernels.cuda.families) places g and the derivative
slots at the family's table rows in the job's combined g and (n, K) table, K the widest
family's. ELL columns are free columns throughout (the physical family's full-vector
columns mapped through its models' free maps), so the target, normal equations and var(g)
run unchanged. The CPU twin is scaling.family.ModelFamilies (one kernel call per family).

Where the per-row inputs come from:
- HostMixedLayout: built on the host from a table's rows (every family's inputs and the
  combined ELL columns; the CPU work of a round, as the fused pass's inputs are), uploaded
  per round by device_from_host;
- resident_families: gathered on the device from the job's resident job-order inputs of
  each family (backends.cuda_resident_inputs.job_inputs, kind "mixed"), the table's rows
  split by family on the device: nothing with a row per observation goes up;
- StreamedMixedModel: a table streamed from the host (larger than device memory): each
  family's HostMixedLayout inputs page-locked once, each batch's rows of a family copied on
  the batch's stream into per-stream family buffers.
A family of no device kernel (scaling.family.DatasetByDataset) makes the whole job
host-evaluated, as before (family_plan returns None).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..kernels.cuda import array as device_array_model
from ..kernels.cuda import families as kf
from ..kernels.cuda import models as device_models
from ..kernels.cuda import resident_rows as rr
from ..kernels.cuda.launch import THREADS_PER_BLOCK, blocks

KINDS = {"KB": "kb", "smooth rotation": "physical", "array": "array"}
N_GUARD = 5  # scaling.physical_pass.GUARD's entries after a physical family's parameters


def family_plan(models):
    """[(kind, datasets)] of the job's model families in order of their first dataset
    (kind "kb", "physical" or "array"), or None when some model has no device kernel."""
    from ..scaling.family import family_key

    groups = {}
    for d, model in enumerate(models):
        groups.setdefault(family_key(model), []).append(d)
    plan = []
    for key, datasets in groups.items():
        kind = KINDS.get(key[0])
        if kind is None:
            return None
        plan.append((kind, np.asarray(datasets, dtype=np.int64)))
    return plan


def applies(models):
    """True when the mixed evaluation is what a device target needs: not one KB family,
    not one fused physical layout, not only array models (cuda_scaling.array_layout takes
    them as one layout), and every family has a kernel."""
    from ..scaling.family import KBFamily
    from ..scaling.physical_pass import uses_fused_physical_pass

    if not models or KBFamily.applies(models) or uses_fused_physical_pass(models):
        return False
    plan = family_plan(models)
    return plan is not None and [kind for kind, _ in plan] != ["array"]


def members_of(manager, datasets):
    return ([manager.models[d] for d in datasets],
            [manager.column_of_parameter[d] for d in datasets])


def physical_free_map(columns):
    """Free column of each entry of a physical family's full vector (guard: -1), int64."""
    return np.concatenate([np.asarray(c, dtype=np.int64) for c in columns]
                          + [np.full(N_GUARD, -1, np.int64)])


def array_free_map(columns):
    return np.concatenate([np.asarray(c, dtype=np.int64) for c in columns]
                          + [np.full(1, -1, np.int64)])


def host_inputs(kind, members, columns, dataset_id, loc_index):
    """(per-row inputs by name, free ELL columns (n, K) int64) of one family's rows
    (dataset_id numbers the family's members), or None (array models without a layout)."""
    if kind == "kb":
        from ..scaling.family import KBFamily

        fam = KBFamily(members, columns, dataset_id, loc_index)
        inputs = {"row_dataset": np.ascontiguousarray(fam.row_dataset, np.int64),
                  "inv_two_d_sq": np.ascontiguousarray(fam.inv_two_d_sq, np.float64),
                  "fixed": fam.fixed_factor}
        cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col,
                                               fam.decay_col).astype(np.int64)
        return inputs, cols
    if kind == "physical":
        from ..scaling.physical_pass import PhysicalPassInputs

        f = PhysicalPassInputs(members, np.asarray(dataset_id, np.int64),
                               np.asarray(loc_index, np.int64), None, None)
        n_abs = 0 if f.absorption_coefficients is None else f.absorption_coefficients.shape[1]
        inputs = {"record": f.record, "first_param": f.first_param,
                  "absorption": f.absorption_coefficients,
                  "absorption_first": f.absorption_first, "fixed": f.fixed_factor}
        full = device_models.physical_columns(f.first_param, f.absorption_first, n_abs)
        return inputs, physical_free_map(columns)[full]
    from .cuda_scaling import array_layout

    layout = array_layout(members, dataset_id, loc_index, columns)
    if layout is None:
        return None
    inputs = {"weights": layout["weights"], "full_index": layout["full_index"],
              "fixed": layout["fixed_factor"], "component_start": layout["component_start"]}
    return inputs, np.asarray(layout["free_col"], dtype=np.int64)


class HostMixedLayout:
    """Every family's per-row inputs of a table's rows, built on the host, and the combined
    free ELL columns (n, K) (-1 in a narrower family's extra slots)."""

    def __init__(self, manager, plan, dataset_id, loc_index):
        dataset_id = np.asarray(dataset_id, dtype=np.int64)
        loc_index = np.asarray(loc_index, dtype=np.int64)
        self.n = n = int(dataset_id.size)
        n_sets = len(manager.models)
        family_of_dataset = np.full(n_sets, -1, np.int64)
        renumber = np.full(n_sets, -1, np.int64)
        for f, (_, datasets) in enumerate(plan):
            family_of_dataset[datasets] = f
            renumber[datasets] = np.arange(datasets.size)
        row_family = family_of_dataset[dataset_id]
        self.families = []  # (kind, datasets, rows, inputs, cols)
        self.ok = True
        for f, (kind, datasets) in enumerate(plan):
            rows = np.flatnonzero(row_family == f)
            members, columns = members_of(manager, datasets)
            built = host_inputs(kind, members, columns, renumber[dataset_id[rows]],
                                loc_index[rows]) if rows.size else None
            if rows.size and built is None:
                self.ok = False
                return
            inputs, cols = built if built is not None else ({}, np.zeros((0, 0), np.int64))
            self.families.append((kind, datasets, rows, inputs, cols))
        self.width = max([c.shape[1] for *_, c in self.families if c.shape[0]], default=1)
        self.cols = np.full((n, self.width), -1, dtype=np.int64)
        for _, _, rows, _, cols in self.families:
            if rows.size:
                self.cols[rows, :cols.shape[1]] = cols

    def inputs_bytes(self):
        return sum(int(v.nbytes) for *_, inputs, _ in self.families for k, v in inputs.items()
                   if v is not None and k != "component_start")


class DeviceFamily:
    """One family's rows of a table on the device: inputs (device arrays by name, optional
    ones None), positions (its rows in the table, device int64) and free ELL columns."""

    def __init__(self, kind, manager, datasets, n, positions, inputs, cols, put_parameters):
        self.kind, self.datasets, self.n = kind, datasets, int(n)
        self.members, self.columns = members_of(manager, datasets)
        self.positions, self.cols = positions, cols
        self.width = int(cols.shape[1])
        self.put_parameters = put_parameters
        zero = put_parameters(np.zeros(1))
        self.fixed = inputs.get("fixed")
        self.has_fixed = self.fixed is not None
        if not self.has_fixed:
            self.fixed = zero
        if kind == "kb":
            from ..scaling.family import KBFamily

            empty = np.zeros(0, np.int64)  # the per-dataset K, B and their columns only
            self.kb = KBFamily(self.members, self.columns, empty, empty)
            self.row_dataset, self.inv_two_d_sq = inputs["row_dataset"], inputs["inv_two_d_sq"]
        elif kind == "physical":
            self.record, self.first_param = inputs["record"], inputs["first_param"]
            self.has_abs = inputs.get("absorption") is not None
            self.abs = (inputs["absorption"] if self.has_abs
                        else put_parameters(np.zeros((1, 1))))
            self.abs_first = (inputs["absorption_first"] if self.has_abs
                              else put_parameters(np.zeros(1, np.int32)))
        else:
            self.weights, self.full_index = inputs["weights"], inputs["full_index"]
            self.component_start = put_parameters(inputs["component_start"])
        self.g = cuda.device_array(max(self.n, 1))
        self.deriv = cuda.device_array((max(self.n, 1), self.width))

    def _parameters(self):
        """The family's parameters at the models' current values (the caller set x)."""
        from ..scaling.physical_pass import GUARD

        vectors = [np.asarray(m.parameter_vector(), dtype=np.float64) for m in self.members]
        if self.kind == "physical":
            return self.put_parameters(np.concatenate(vectors + [GUARD]))
        return self.put_parameters(np.concatenate(vectors + [np.ones(1)]))

    def launch(self, x, with_derivatives):
        """g (and dg/dp) of the family's rows into its own buffers."""
        n = self.n
        b, tpb = blocks(n), THREADS_PER_BLOCK
        g, deriv = self.g[:n], self.deriv[:n]
        if self.kind == "kb":
            scale, decay = self.kb.parameters(x)
            scale, decay = self.put_parameters(scale), self.put_parameters(decay)
            if with_derivatives:
                device_models.kb_family_kernel[b, tpb](
                    self.row_dataset, self.inv_two_d_sq, self.fixed, self.has_fixed, scale,
                    decay, g, deriv)
            else:
                device_models.kb_family_g_kernel[b, tpb](
                    self.row_dataset, self.inv_two_d_sq, self.fixed, self.has_fixed, scale,
                    decay, g)
        elif self.kind == "physical":
            args = (self.record, self.first_param, self.abs, self.abs_first, self.has_abs,
                    self.fixed, self.has_fixed, self._parameters(), g)
            if with_derivatives:
                device_models.physical_model_kernel[b, tpb](*args, deriv)
            else:
                device_models.physical_g_kernel[b, tpb](*args)
        else:
            args = (self.weights, self.full_index, self.component_start, self.fixed,
                    self.has_fixed, self._parameters(), g)
            if with_derivatives:
                device_array_model.array_model_kernel[b, tpb](*args, deriv)
            else:
                device_array_model.array_g_kernel[b, tpb](*args)


class MixedModel:
    """The device families of one table: evaluate(x, g, deriv) fills the combined g and
    (n, width) derivative table; cols: the combined free ELL columns on the device (None
    until asked for when the table came from the host)."""

    def __init__(self, families, n, width, cols=None, host_cols=None, upload=None):
        self.families = [f for f in families if f.n]
        self.n, self.width = int(n), int(width)
        self._cols, self.host_cols, self._upload = cols, host_cols, upload

    @property
    def cols(self):
        if self._cols is None:
            self._cols = self._upload(np.ascontiguousarray(self.host_cols, np.int64))
        return self._cols

    def prepare(self, deriv):
        """Zero the combined table once: a family's scatter writes only its own slots."""
        if self.n:
            kf.fill_rows_kernel[blocks(self.n), THREADS_PER_BLOCK](deriv, 0.0)

    def evaluate(self, x, g, deriv=None):
        """g (and dg/dp) of every row at free vector x; the models' parameters must already
        be x's (manager.set_free(x))."""
        x = np.asarray(x, dtype=np.float64)
        for family in self.families:
            family.launch(x, deriv is not None)
            n, tpb = family.n, THREADS_PER_BLOCK
            kf.scatter_kernel[blocks(n), tpb](family.g[:n], family.positions, g)
            if deriv is not None:
                kf.scatter_rows_kernel[blocks(n), tpb](family.deriv[:n], family.positions,
                                                       deriv)


def device_from_host(layout, manager, put, put_parameters):
    """The MixedModel of a HostMixedLayout, its per-row inputs uploaded by put(name, array)
    (per round) and the combined columns uploaded only if asked for."""
    families = []
    for f, (kind, datasets, rows, inputs, cols) in enumerate(layout.families):
        if not rows.size:
            continue
        device = {}
        for name, value in inputs.items():
            if value is None or name == "component_start":
                device[name] = value
            else:
                device[name] = put(f"{f} {kind} {name}", np.ascontiguousarray(value))
        positions = put(f"{f} positions", rows.astype(np.int64))
        families.append(DeviceFamily(kind, manager, datasets, rows.size, positions, device,
                                     cols, put_parameters))
    return MixedModel(families, layout.n, layout.width, host_cols=layout.cols,
                      upload=lambda a: put("cols", a))


# -- the job-order inputs of each family, resident ------------------------------------------
def job_family_offsets(plan, offsets):
    """Per family, its datasets' first rows in the family's job-order inputs (the family's
    datasets' job rows concatenated in dataset order), then the family's row count."""
    sizes = np.diff(np.asarray(offsets, dtype=np.int64))
    return [np.concatenate([[0], np.cumsum(sizes[datasets])]).astype(np.int64)
            for _, datasets in plan]


def build_job_inputs(models, column_of_parameter, offsets):
    """Every family's inputs of all its job rows (host), by "f kind name"; None when some
    family has no device layout."""
    from .cuda_resident_inputs import _job_rows

    plan = family_plan(models)
    if plan is None:
        return None
    out = {}
    for f, ((kind, datasets), local) in enumerate(zip(plan, job_family_offsets(plan,
                                                                              offsets))):
        members = [models[d] for d in datasets]
        columns = [column_of_parameter[d] for d in datasets]
        dataset_id, loc_index = _job_rows(local)
        if not dataset_id.size:
            continue
        built = host_inputs(kind, members, columns, dataset_id, loc_index)
        if built is None:
            return None
        for name, value in built[0].items():
            out[f"{f} {kind} {name}"] = value
    return out


def resident_families(store, manager, job, offsets, order, host_layout=None):
    """The MixedModel of the table whose rows are the job rows `order` (device int64), its
    families' inputs gathered from the resident job-order inputs `job` (build_job_inputs'
    names, on the device) and its columns made on the device; None when the device's split
    disagrees with host_layout's row counts per family (then the caller uploads)."""
    plan = family_plan(manager.models)
    n = int(order.shape[0])
    tpb = THREADS_PER_BLOCK
    n_sets = len(manager.models)
    dataset_family = np.full(max(n_sets, 1), -1, np.int32)
    dataset_local = np.zeros(max(n_sets, 1), np.int64)
    for f, ((_, datasets), local) in enumerate(zip(plan, job_family_offsets(plan, offsets))):
        dataset_family[datasets] = f
        dataset_local[datasets] = local[:-1]
    row_family = cuda.device_array(max(n, 1), np.int32)
    local_row = cuda.device_array(max(n, 1), np.int64)
    if n:
        kf.row_family_kernel[blocks(n), tpb](
            order, store.put(np.asarray(offsets, np.int64)), store.put(dataset_family),
            store.put(dataset_local), row_family[:n], local_row[:n])
    families, width = [], 1
    for f, (kind, datasets) in enumerate(plan):
        members, columns = members_of(manager, datasets)
        chunk, chunk_offset = rr._exclusive_chunk_offsets(
            kf.family_count_kernel, (row_family[:n], np.int32(f)), n)
        n_f = int(chunk_offset[chunk_offset.shape[0] - 1:].copy_to_host()[0]) if n else 0
        if host_layout is not None and n_f != host_layout.families[f][2].size:
            return None
        if not n_f:
            continue
        positions = cuda.device_array(n_f, np.int64)
        source = cuda.device_array(n_f, np.int64)
        kf.family_fill_kernel[blocks(chunk_offset.shape[0] - 1), tpb](
            row_family[:n], local_row[:n], np.int32(f), chunk, chunk_offset, positions, source)
        inputs = {}
        prefix = f"{f} {kind} "
        for name, value in job.items():
            if not name.startswith(prefix):
                continue
            short = name[len(prefix):]
            if value is None or short == "component_start":
                inputs[short] = value
            else:
                inputs[short] = _gather(store, value, source)
        cols = _family_columns(store, kind, inputs, members, columns, n_f)
        width = max(width, cols.shape[1])
        families.append(DeviceFamily(kind, manager, datasets, n_f, positions, inputs, cols,
                                     store.put))
    combined = cuda.device_array((max(n, 1), width), np.int64)
    if n:
        kf.fill_rows_kernel[blocks(n), tpb](combined, -1)
    for family in families:
        kf.scatter_rows_kernel[blocks(family.n), tpb](family.cols, family.positions, combined)
    return MixedModel(families, n, width, cols=combined[:n],
                      host_cols=None if host_layout is None else host_layout.cols)


def _gather(store, source, rows):
    if source.ndim == 1:
        return store.gather(source, rows)
    n = int(rows.shape[0])
    out = cuda.device_array((max(n, 1), source.shape[1]), dtype=source.dtype)
    if n:
        rr.gather_rows_kernel[blocks(n), THREADS_PER_BLOCK](source, rows, out[:n])
    return out[:n]


def _family_columns(store, kind, inputs, members, columns, n):
    """A family's free ELL columns (n, K) int64 made on the device from its gathered
    inputs and parameter-sized free maps."""
    tpb, b = THREADS_PER_BLOCK, blocks(n)
    if kind == "kb":
        from ..scaling.family import KBFamily

        empty = np.zeros(0, np.int64)  # the per-dataset columns only
        fam = KBFamily(members, columns, empty, empty)
        scale_col = fam.scale_col.astype(np.int64)
        decay_col = fam.decay_col.astype(np.int64)
        cols = cuda.device_array((n, 2), np.int64)
        rr.kb_columns_kernel[b, tpb](inputs["row_dataset"], store.put(scale_col),
                                     store.put(decay_col), cols)
        return cols
    if kind == "physical":
        has_abs = inputs.get("absorption") is not None
        width = 6 + (int(inputs["absorption"].shape[1]) if has_abs else 0)
        full = cuda.device_array((n, width), np.int64)
        abs_first = (inputs["absorption_first"] if has_abs
                     else store.put(np.zeros(1, np.int32)))
        rr.physical_columns_kernel[b, tpb](inputs["first_param"], abs_first, has_abs, full)
        cols = cuda.device_array((n, width), np.int64)
        rr.map_columns_kernel[b, tpb](full, store.put(physical_free_map(columns)), cols)
        return cols
    cols = cuda.device_array((n, int(inputs["full_index"].shape[1])), np.int64)
    rr.map_columns_kernel[b, tpb](inputs["full_index"], store.put(array_free_map(columns)),
                                  cols)
    return cols


# -- a table streamed from the host (backends.cuda_streamed_scaling) ------------------------
class StreamedMixedModel:
    """The families of a HostMixedLayout whose table stays on the host
    (kernels.cuda.streamed.HostStreamedTarget): per batch of whole groups, each family's
    rows of the batch (a contiguous run of the family's rows, as both are in table order)
    have their inputs and batch-local positions copied on the batch's stream into that
    stream's reusable family buffers, the family kernels run there and the scatter fills the
    batch's combined g and derivative table. The host inputs are page-locked once, here.

    batch_bounds: (lo, hi) table rows of each non-empty batch, in batch order; n_sets: the
    buffer sets (streams) of the streamed target; put_parameters: upload of each call's
    family parameters (counted by the caller)."""

    def __init__(self, layout, manager, batch_bounds, n_sets, put_parameters):
        from ..kernels.cuda.streamed import _pinned_copy

        self.width = int(layout.width)
        self.put_parameters = put_parameters
        lows = np.asarray([lo for lo, _ in batch_bounds] or [0], dtype=np.int64)
        self.families = []
        for kind, datasets, rows, inputs, cols in layout.families:
            if not rows.size:
                continue
            members, columns = members_of(manager, datasets)
            batch_of_row = np.searchsorted(lows, rows, side="right") - 1
            host = {name: _pinned_copy(value) for name, value in inputs.items()
                    if value is not None and name != "component_start"}
            host["positions"] = _pinned_copy((rows - lows[batch_of_row]).astype(np.int64))
            ranges = {(lo, hi): (int(np.searchsorted(rows, lo)), int(np.searchsorted(rows, hi)))
                      for lo, hi in batch_bounds}
            n_max = max([b - a for a, b in ranges.values()] + [1])
            family = {"kind": kind, "members": members, "columns": columns, "host": host,
                      "ranges": ranges, "width": int(cols.shape[1]),
                      "component_start": inputs.get("component_start")}
            if kind == "kb":
                from ..scaling.family import KBFamily

                empty = np.zeros(0, np.int64)  # the per-dataset K, B and their columns only
                family["kb"] = KBFamily(members, columns, empty, empty)
            family["buffers"] = [self._buffers(host, n_max, family["width"])
                                 for _ in range(n_sets)]
            self.families.append(family)
        # one-element stand-ins for the optional inputs a family does not have
        self._zero = cuda.to_device(np.zeros(1))
        self._zero_2d = cuda.to_device(np.zeros((1, 1)))
        self._zero_int = cuda.to_device(np.zeros(1, np.int32))

    @staticmethod
    def _buffers(host, n_max, width):
        out = {name: cuda.device_array(n_max * max(int(np.prod(a.shape[1:])), 1), a.dtype)
               for name, a in host.items()}
        out["g"] = cuda.device_array(n_max)
        out["deriv"] = cuda.device_array(n_max * max(width, 1))
        return out

    def host_bytes(self):
        """Bytes each call copies up (every family's inputs and positions, all batches)."""
        return sum(int(a.nbytes) for f in self.families for a in f["host"].values())

    def device_bytes(self):
        return sum(int(a.nbytes) for f in self.families for buffers in f["buffers"]
                   for a in buffers.values())

    def _parameters(self, family, x):
        """The family's parameters at x on the device, once per call (the caller set x)."""
        from ..scaling.physical_pass import GUARD

        if family["kind"] == "kb":
            scale, decay = family["kb"].parameters(x)
            return self.put_parameters(scale), self.put_parameters(decay)
        vectors = [np.asarray(m.parameter_vector(), dtype=np.float64)
                   for m in family["members"]]
        tail = GUARD if family["kind"] == "physical" else np.ones(1)
        parameters = (self.put_parameters(np.concatenate(vectors + [tail])),)
        if family["kind"] == "array":
            parameters += (self.put_parameters(family["component_start"]),)
        return parameters

    def launcher(self, x):
        """launch(stream, views, g, deriv) of one streamed batch at free vector x (the
        models' parameters must already be x's); views["rows"]: the batch's table rows,
        views["buffer_set"]: the stream's buffer set."""
        from ..kernels.cuda.streamed import _view

        x = np.asarray(x, dtype=np.float64)
        parameters = [self._parameters(f, x) for f in self.families]
        narrower = any(f["width"] < self.width for f in self.families)
        tpb = THREADS_PER_BLOCK

        def launch(stream, views, g, deriv):
            rows, k = views["rows"], views["buffer_set"]
            if narrower:  # a narrower family's extra slots: zero in the reused buffer
                kf.fill_rows_kernel[blocks(deriv.shape[0]), tpb, stream](deriv, 0.0)
            for family, params in zip(self.families, parameters):
                a, b = family["ranges"][rows]
                m = b - a
                if not m:
                    continue
                buffers = family["buffers"][k]
                v = {}
                for name, array in family["host"].items():
                    part = array[a:b]
                    v[name] = _view(buffers[name], part.shape)
                    v[name].copy_to_device(part, stream=stream)
                fg = _view(buffers["g"], (m,))
                fd = _view(buffers["deriv"], (m, family["width"]))
                fixed, has_fixed = v.get("fixed", self._zero), "fixed" in v
                grid = blocks(m), tpb, stream
                if family["kind"] == "kb":
                    device_models.kb_family_kernel[grid](
                        v["row_dataset"], v["inv_two_d_sq"], fixed, has_fixed, *params, fg,
                        fd)
                elif family["kind"] == "physical":
                    has_abs = "absorption" in v
                    device_models.physical_model_kernel[grid](
                        v["record"], v["first_param"], v.get("absorption", self._zero_2d),
                        v.get("absorption_first", self._zero_int), has_abs, fixed,
                        has_fixed, params[0], fg, fd)
                else:
                    device_array_model.array_model_kernel[grid](
                        v["weights"], v["full_index"], params[1], fixed, has_fixed,
                        params[0], fg, fd)
                kf.scatter_kernel[grid](fg, v["positions"], g)
                kf.scatter_rows_kernel[grid](fd, v["positions"], deriv)
        return launch
