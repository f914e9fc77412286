"""compute.device=cuda: each scaling round's minimisation table made on the device from the
job's resident columns, so a round after the first copies no array with a row per
observation except a one-byte keep flag per job row when the subset changed.

Resident for the whole job (backends.cuda_job_table roles; uploaded once):
- the job's group sort (GroupLayout: its rows in group order and its group offsets);
- I and sigma^2 of every job row (the job table's "intensity" and "variance");
- the model's per-row inputs of every job row, in job row order, per parameter layout (the
  models and their parameter counts): KB's dataset and 1/2d^2, the physical record (smoother
  weights), first parameters and absorption coefficients, the array model's grid weights and
  parameter indices, the fixed factor; a job of several model families keeps each family's
  inputs in the family's own job order (backends.cuda_mixed_models: the round's rows are
  split by family on the device).
Per round (ScalingRun.minimisation_table: the rows selected and not outliers): the keep flags
(uint8 per job row) go up when they differ from the last round's; the table's rows, group
offsets (kernels.cuda.resident_rows.subset_table), I and weights (weights from I, sigma^2
and each dataset's a, b), the model's inputs (gathered through the table's rows), the ELL
columns (from the gathered inputs and the free-parameter map, a parameter-sized array) and
the gradient's column entries are all made on the device.

The host still builds the round's table (the CPU target's own arrays; the counts and a
sample of the device's rows are checked against it, and any difference falls back to
uploading the table as before).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..kernels.cuda import resident_rows as rr
from ..kernels.cuda.launch import THREADS_PER_BLOCK, blocks
from .cuda_job_table import _row_offsets, current_job_table, room_to_keep

# table rows compared with the host's table per round (positions spread over the table)
CHECK_SAMPLES = 64


class ResidentMinimisation:
    """The device arrays of one round's minimisation table (see the module docstring)."""

    def __init__(self, run, store, order, group_start, intensity, weight):
        self.run, self.store = run, store
        self.order, self.group_start = order, group_start
        self.intensity, self.weight = intensity, weight
        self.n = int(order.shape[0])

    # -- gathers ---------------------------------------------------------------------------
    def gather(self, source):
        if source.ndim == 1:
            return self.store.gather(source, self.order)
        out = cuda.device_array((max(self.n, 1), source.shape[1]), dtype=source.dtype)
        if self.n:
            rr.gather_rows_kernel[blocks(self.n), THREADS_PER_BLOCK](source, self.order,
                                                                     out[:self.n])
        return out[:self.n]

    def _placeholder(self, array, dtype=np.float64, ndim=1):
        if array is None:
            return self.store.put(np.zeros((1,) * ndim, dtype=dtype), "parameters"), False
        return self.gather(array), True

    # -- the model's inputs ----------------------------------------------------------------
    def model_inputs(self, kind, manager, family=None):
        """The device inputs of the round's model kernel ("kb", "physical" or "array") in the
        table's order, with "cols" (the ELL columns the target's gradient uses: free columns,
        physical: the full vector's): None when the job-order inputs cannot stay resident
        (no room, or a model the job-order builder does not take). "mixed" (several model
        families, backends.cuda_mixed_models): {"mixed": its MixedModel, "cols": free
        columns}, each family's rows found and its inputs gathered on the device."""
        job = _job_inputs(self.run, self.store, kind, manager)
        if job is None:
            return None
        n, out = self.n, {}
        if kind == "mixed":  # family: the round's HostMixedLayout (its row counts checked)
            from .cuda_mixed_models import resident_families

            mixed = resident_families(self.store, manager, job, _row_offsets(self.run),
                                      self.order, family)
            return None if mixed is None else {"mixed": mixed, "cols": mixed.cols}
        if kind == "kb":
            out["row_dataset"] = self.gather(job["row_dataset"])
            out["inv_two_d_sq"] = self.gather(job["inv_two_d_sq"])
            out["fixed"], out["has_fixed"] = self._placeholder(job.get("fixed"))
            cols = cuda.device_array((max(n, 1), 2), np.int32)
            if n:
                rr.kb_columns_kernel[blocks(n), THREADS_PER_BLOCK](
                    out["row_dataset"], self.store.put(family.scale_col),
                    self.store.put(family.decay_col), cols[:n])
        elif kind == "physical":
            out["record"] = self.gather(job["record"])
            out["first_param"] = self.gather(job["first_param"])
            out["abs"], out["has_abs"] = self._placeholder(job.get("absorption"), ndim=2)
            out["abs_first"], _ = self._placeholder(job.get("absorption_first"), np.int32)
            out["fixed"], out["has_fixed"] = self._placeholder(job.get("fixed"))
            n_abs = 0 if job.get("absorption") is None else int(job["absorption"].shape[1])
            cols = cuda.device_array((max(n, 1), 6 + n_abs), np.int64)
            if n:
                rr.physical_columns_kernel[blocks(n), THREADS_PER_BLOCK](
                    out["first_param"], out["abs_first"], out["has_abs"], cols[:n])
        else:
            out["weights"] = self.gather(job["weights"])
            out["full_index"] = self.gather(job["full_index"])
            out["fixed"], out["has_fixed"] = self._placeholder(job.get("fixed"))
            out["component_start"] = self.store.put(job["component_start"])
            # free column of each slot: the free map of the full vector (guard: -1)
            column_map = np.concatenate([np.asarray(c, dtype=np.int32)
                                         for c in manager.column_of_parameter]
                                        + [np.full(1, -1, np.int32)])
            cols = cuda.device_array((max(n, 1), job["weights"].shape[1]), np.int32)
            if n:
                rr.map_columns_kernel[blocks(n), THREADS_PER_BLOCK](
                    out["full_index"], self.store.put(column_map), cols[:n])
        out["cols"] = cols[:n]
        return out

    def map_columns(self, cols, column_map):
        """column_map[cols] (-1 stays -1) on the device, int64: the normal equations' free
        columns of the physical layout's full-vector columns."""
        out = cuda.device_array((max(self.n, 1), cols.shape[1]), np.int64)
        if self.n:
            rr.map_columns_kernel[blocks(self.n), THREADS_PER_BLOCK](
                cols, self.store.put(np.ascontiguousarray(column_map, np.int64)),
                out[:self.n])
        return out[:self.n]


def _job_rows(offsets):
    sizes = np.diff(offsets)
    dataset_id = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    return dataset_id, np.arange(int(offsets[-1]), dtype=np.int64) - offsets[dataset_id]


def _build_job_inputs(kind, models, column_of_parameter, offsets):
    """The model's per-row inputs of every job row (host, numpy), by name; None when the
    models have no such layout."""
    if kind == "mixed":  # several model families: each family's inputs, "f kind name"
        from .cuda_mixed_models import build_job_inputs

        return build_job_inputs(models, column_of_parameter, offsets)
    dataset_id, loc_index = _job_rows(offsets)
    if kind == "kb":
        from ..scaling.family import KBFamily

        fam = KBFamily(models, column_of_parameter, dataset_id, loc_index)
        return {"row_dataset": np.ascontiguousarray(fam.row_dataset, np.int64),
                "inv_two_d_sq": np.ascontiguousarray(fam.inv_two_d_sq, np.float64),
                "fixed": fam.fixed_factor}
    if kind == "physical":
        from ..scaling.physical_pass import PhysicalPassInputs

        f = PhysicalPassInputs(models, dataset_id, loc_index, None, None)
        return {"record": f.record, "first_param": f.first_param,
                "absorption": f.absorption_coefficients,
                "absorption_first": f.absorption_first, "fixed": f.fixed_factor}
    from .cuda_scaling import array_layout

    layout = array_layout(models, dataset_id, loc_index, column_of_parameter)
    if layout is None:
        return None
    return {"weights": layout["weights"], "full_index": layout["full_index"],
            "fixed": layout["fixed_factor"],
            "component_start": layout["component_start"]}


def _job_inputs(run, store, kind, manager):
    return job_inputs(store, kind, manager, _row_offsets(run))


def job_inputs(store, kind, manager, offsets):
    """The job-order inputs on the device (dict of device arrays, "component_start" on the
    host), uploaded once per job and parameter layout: the same models (kept referenced so
    their ids are not reused) with the same parameter counts over the same job rows
    (offsets: each dataset's first job row, then the number of rows). None when they cannot
    stay resident. Shared by the scaling rounds and the expansion (backends.cuda_expand)."""
    models = list(manager.models)
    offsets = np.asarray(offsets, dtype=np.int64)
    key = (kind, tuple(id(m) for m in models), tuple(int(m.n_parameters) for m in models),
           offsets.tobytes())
    held = getattr(store, "job_inputs", None)
    if held is not None and held["key"] == key:
        return held["device"]
    store.job_inputs = None
    for role in [r for r in store.resident_roles() if r.startswith("job model inputs")]:
        store.invalidate(role)
    host = _build_job_inputs(kind, models, manager.column_of_parameter, offsets)
    if host is None:
        return None
    nbytes = sum(v.nbytes for k, v in host.items()
                 if v is not None and not k.endswith("component_start"))
    if not room_to_keep(nbytes):
        return None
    device = {}
    for name, value in host.items():
        if value is None or name.endswith("component_start"):
            device[name] = value
        else:
            device[name] = store.keyed(f"job model inputs ({kind}) {name}", key,
                                       lambda v=value: np.ascontiguousarray(v))
    store.job_inputs = {"key": key, "device": device, "models": models}
    return device


def resident_minimisation(run, table):
    """The round's table (run.minimisation_table()) on the device from the job's resident
    columns (ResidentMinimisation), or None when it cannot be derived there (no group sort,
    an error model without a device formula, or a device table that differs from the
    host's: then the caller uploads the table)."""
    store = current_job_table()
    layout = getattr(run, "_layout", None)
    if layout is None or getattr(table, "dataset_id", None) is None:
        return None
    offsets = _row_offsets(run)
    if not np.array_equal(layout.offsets, offsets) or layout.n_obs != int(offsets[-1]):
        return None
    n_sets = len(run.states)
    intensity = store.column("intensity", [s.intensity for s in run.states])
    variance = store.column("variance", [s.variance for s in run.states])
    row_dataset = store.keyed(
        "row_dataset", offsets.tobytes(),
        lambda: np.repeat(np.arange(n_sets, dtype=np.int32), np.diff(offsets)))
    weight_rows = store.error_model_weights(intensity, variance, row_dataset,
                                            [s.error_model for s in run.states])
    if weight_rows is None:
        return None
    # the group sort of all job rows: once per job (the run keeps its layout)
    layout_order = store.keyed("job layout order", offsets.tobytes(),
                               lambda: np.ascontiguousarray(layout.order, np.int64),
                               hold=[layout.order, layout.group_start])
    layout_group_start = store.keyed("job layout group_start", offsets.tobytes(),
                                     lambda: np.ascontiguousarray(layout.group_start,
                                                                  np.int64),
                                     hold=[layout.order, layout.group_start])
    # the round's subset: one byte per job row, uploaded only when it changed
    keep = np.concatenate([s.selected & ~s.outlier for s in run.states]).astype(np.uint8)
    keep_device = store.content("minimisation keep", keep)
    order, group_start, n_rows, n_groups = rr.subset_table(keep_device, layout_order,
                                                           layout_group_start)
    if not _agrees_with_host(store, table, offsets, order, group_start, n_rows, n_groups):
        return None
    return ResidentMinimisation(run, store, order, group_start,
                                store.gather(intensity, order), store.gather(weight_rows, order))


def _agrees_with_host(store, table, offsets, order, group_start, n_rows, n_groups):
    """The device table's counts equal the host table's, and so do its rows and group
    offsets at CHECK_SAMPLES positions spread over them (a guard against a host table built
    otherwise than from the run's layout and the states' masks; only the samples come
    back, nothing goes up)."""
    host_group_start = np.asarray(table.group_start)
    if n_rows != int(table.n_obs) or n_groups != host_group_start.size - 1:
        return False
    if n_rows == 0:
        return True
    rows = rr.sample_positions(n_rows, CHECK_SAMPLES)
    host_rows = (offsets[np.asarray(table.dataset_id)[rows]]
                 + np.asarray(table.loc_index)[rows])
    if not np.array_equal(rr.sample(order, CHECK_SAMPLES), host_rows):
        return False
    groups = rr.sample_positions(n_groups + 1, CHECK_SAMPLES)
    return bool(np.array_equal(rr.sample(group_start, CHECK_SAMPLES),
                               host_group_start[groups]))
