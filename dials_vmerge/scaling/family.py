"""Model families evaluated for all their datasets at once over the rows of one IhTable.

A family gathers, once per table, each row's inputs from the datasets' models (row-level
arrays in the table's order) and, per dataset, where its parameters sit in the global free
vector; every later evaluation is then one kernel call over all rows, whatever the number
of datasets. Families: KB (kernels/kb_family.py) and the smooth-rotation models, physical
and dose_decay (kernels/physical_family.py, on the inputs of the fused pass,
physical_pass.py) and array (kernels/array_family.py). ModelFamilies evaluates a job whose
datasets use several families with one kernel call per family; a model of no family is
evaluated dataset by dataset.
"""

from __future__ import annotations

import numpy as np

from ..kernels.flat import gather_by_dataset, split_positions
from ..kernels.kb_family import evaluate_kb_family, evaluate_kb_family_g
from ..kernels.array_family import (GRID_AXES, GRID_SLOTS, N_GRIDS, evaluate_array_family,
                                    evaluate_array_family_g)
from ..kernels.physical_family import (DERIVATIVE_BLOCK_ROWS, DOSE_AND_B, NO_EXPONENT, SMOOTH_B,
                                       evaluate_smooth_rotation_family,
                                       evaluate_smooth_rotation_family_g,
                                       evaluate_smooth_rotation_family_variance,
                                       smooth_rotation_g_kernel)
from .physical_pass import GUARD, PhysicalPassInputs


class KBFamily:
    @staticmethod
    def applies(models) -> bool:
        return bool(models) and all(hasattr(m, "family_description") for m in models)

    def __init__(self, models, column_of_parameter, row_dataset, local_row):
        """column_of_parameter: per dataset, full parameter index -> global free column or -1
        (ParameterManager); row_dataset, local_row: per row its dataset position and its
        row among the rows that dataset's model was configured with."""
        descriptions = [m.family_description() for m in models]
        self.row_dataset = np.ascontiguousarray(row_dataset, dtype=np.int64)
        local_row = np.asarray(local_row, dtype=np.int64)
        self.inv_two_d_sq = gather_by_dataset([d["inv_two_d_sq"] for d in descriptions],
                                              self.row_dataset, local_row)
        self.fixed_factor = None
        if any(d["fixed"] is not None for d in descriptions):
            self.fixed_factor = gather_by_dataset(
                [d["fixed"] if d["fixed"] is not None else np.ones(len(d["inv_two_d_sq"]))
                 for d in descriptions], self.row_dataset, local_row)
        n = len(models)
        self.scale_value = np.ones(n)
        self.decay_value = np.zeros(n)
        self.scale_col = np.full(n, -1, dtype=np.int32)
        self.decay_col = np.full(n, -1, dtype=np.int32)
        for d, (model, desc) in enumerate(zip(models, descriptions)):
            vector = model.parameter_vector()
            columns = column_of_parameter[d]
            if desc["scale_index"] >= 0:
                self.scale_value[d] = vector[desc["scale_index"]]
                self.scale_col[d] = columns[desc["scale_index"]]
            if desc["decay_index"] >= 0:
                self.decay_value[d] = vector[desc["decay_index"]]
                self.decay_col[d] = columns[desc["decay_index"]]

    def parameters(self, x):
        """(K, B) per dataset with the free ones taken from the global vector x."""
        scale, decay = self.scale_value.copy(), self.decay_value.copy()
        free = self.scale_col >= 0
        scale[free] = x[self.scale_col[free]]
        free = self.decay_col >= 0
        decay[free] = x[self.decay_col[free]]
        return scale, decay

    def evaluate(self, x):
        """(g, deriv_values, deriv_col) of every row, columns in the global free vector."""
        scale, decay = self.parameters(x)
        return evaluate_kb_family(self.row_dataset, self.inv_two_d_sq, self.fixed_factor,
                                  scale, decay, self.scale_col, self.decay_col)

    def evaluate_g(self, x):
        scale, decay = self.parameters(x)
        return evaluate_kb_family_g(self.row_dataset, self.inv_two_d_sq, self.fixed_factor,
                                    scale, decay)


def absorption_width(model) -> int:
    absorption = model.components.get("absorption") if hasattr(model, "components") else None
    return 0 if absorption is None else int(absorption.n_parameters)


class SmoothRotationFamily:
    """Physical and dose_decay models (SmoothRotationModel) of several datasets: g and the
    ELL derivatives of every row in one kernel call, from the per-row inputs of the fused
    physical pass. All datasets of one family have the same number of absorption terms."""

    @staticmethod
    def applies(models) -> bool:
        return (bool(models) and all(hasattr(m, "pass_inputs") for m in models)
                and len({absorption_width(m) for m in models}) == 1)

    def __init__(self, models, column_of_parameter, row_dataset, local_row, inputs=None):
        """inputs: the fused pass's PhysicalPassInputs of these rows, when the caller has
        them (a least-squares target): the family reads the same arrays."""
        self.inputs = inputs if inputs is not None else PhysicalPassInputs(
            models, np.asarray(row_dataset), np.asarray(local_row), None, None)
        self.free_col_of_full = np.concatenate(
            [np.asarray(c, dtype=np.int32) for c in column_of_parameter]
            + [np.full(GUARD.size, -1, dtype=np.int32)])
        self.base = self.inputs.full_parameters()
        self.free_entries = np.flatnonzero(self.free_col_of_full >= 0)
        self.free_of_entry = self.free_col_of_full[self.free_entries]

    def parameters(self, x):
        """The full vector (every dataset's parameters, then the guard) at free values x;
        shared components take their one free value in every dataset."""
        full = self.base.copy()
        full[self.free_entries] = np.asarray(x, dtype=np.float64)[self.free_of_entry]
        return full

    def _arrays(self):
        f = self.inputs
        return (f.record, f.first_param, f.absorption_coefficients, f.absorption_first,
                f.fixed_factor)

    def evaluate(self, x):
        return evaluate_smooth_rotation_family(*self._arrays(), self.parameters(x),
                                               self.free_col_of_full)

    def evaluate_g(self, x):
        return evaluate_smooth_rotation_family_g(*self._arrays(), self.parameters(x))

    def evaluate_variance(self, x, covariance):
        """(g, var(g)) without the derivative table (one fused kernel)."""
        return evaluate_smooth_rotation_family_variance(*self._arrays(), self.parameters(x),
                                                        self.free_col_of_full, covariance)


EXPONENT_KINDS = {"smooth B": SMOOTH_B, "dose and B": DOSE_AND_B}


class SmoothRotationGFamily:
    """g alone of physical and dose_decay models of several datasets in one kernel call,
    from each row's smoother coordinates (no weight table, no harmonic coefficients): what
    the expand step needs for every reflection. Absorption enters as each row's value at
    the models' current parameters, so evaluate_g(x) takes x equal to those on the
    absorption entries (evaluate_all_rows does; anything else is refused)."""

    def __init__(self, models, column_of_parameter, row_dataset, local_row):
        row_dataset = np.ascontiguousarray(row_dataset, dtype=np.int64)
        local_row = np.asarray(local_row, dtype=np.int64)
        n, n_models = row_dataset.size, len(models)
        offsets = np.concatenate([[0], np.cumsum([m.n_parameters for m in models])]).astype(
            np.int64)
        self.row_dataset = row_dataset
        self.absorption_value = None
        self.fixed_factor = None
        self.scale_n = np.zeros(n_models, dtype=np.int64)
        self.scale_first = np.zeros(n_models, dtype=np.int64)
        self.exponent_kind = np.full(n_models, NO_EXPONENT, dtype=np.int64)
        self.exponent_n = np.zeros(n_models, dtype=np.int64)
        self.exponent_first = np.full((n_models, 2), -1, dtype=np.int64)
        absorption_entries = []
        positions = split_positions(row_dataset, n_models)
        per_dataset = [model.g_inputs(local_row[obs]) for model, obs in zip(models, positions)]
        # each input stacked over the datasets and placed in one assignment
        order = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        in_order = bool(np.array_equal(order, np.arange(n)))

        def place(pieces, fill, width=None):
            shape = (0,) if width is None else (0, width)
            stacked = np.concatenate(pieces) if pieces else np.zeros(shape)
            if in_order:
                return stacked
            out = np.full_like(stacked, fill)
            out[order] = stacked
            return out

        scale_z, exponent, absorption, fixed = [], [], [], []
        for d, (model, obs, inputs) in enumerate(zip(models, positions, per_dataset)):
            if "scale" in inputs:
                z, n_values, first = inputs["scale"]
                scale_z.append(z)
                self.scale_n[d], self.scale_first[d] = n_values, offsets[d] + first
            else:
                scale_z.append(np.zeros(obs.size))
            if "exponent" in inputs:
                kind, values, n_values, first = inputs["exponent"]
                exponent.append(values)
                self.exponent_kind[d], self.exponent_n[d] = EXPONENT_KINDS[kind], n_values
                self.exponent_first[d] = [offsets[d] + f if f >= 0 else -1 for f in first]
            else:
                exponent.append(np.zeros((obs.size, 2)))
            absorption.append(inputs.get("absorption", np.ones(obs.size)))
            fixed.append(inputs.get("fixed", np.ones(obs.size)))
            if "absorption" in inputs:
                part = model.parameter_slices()["absorption"]
                absorption_entries.append(np.arange(part.start, part.stop) + offsets[d])
        self.scale_z = place(scale_z, 0.0)
        self.exponent_inputs = place(exponent, 0.0, 2)
        if any("absorption" in inputs for inputs in per_dataset):
            self.absorption_value = place(absorption, 1.0)
        if any("fixed" in inputs for inputs in per_dataset):
            self.fixed_factor = place(fixed, 1.0)
        del per_dataset, scale_z, exponent, absorption, fixed
        self.free_col_of_full = np.concatenate(
            [np.asarray(c, dtype=np.int32) for c in column_of_parameter])
        self.base = np.concatenate([np.asarray(m.parameter_vector(), dtype=np.float64)
                                    for m in models])
        self.free_entries = np.flatnonzero(self.free_col_of_full >= 0)
        self.free_of_entry = self.free_col_of_full[self.free_entries]
        self.absorption_entries = (np.concatenate(absorption_entries) if absorption_entries
                                   else np.zeros(0, np.int64))

    def evaluate_g(self, x):
        full = self.base.copy()
        full[self.free_entries] = np.asarray(x, dtype=np.float64)[self.free_of_entry]
        if not np.array_equal(full[self.absorption_entries],
                              self.base[self.absorption_entries]):
            raise ValueError("absorption values were taken at other parameters")
        g = np.empty(self.row_dataset.size)
        smooth_rotation_g_kernel(self.row_dataset, self.scale_z, self.exponent_inputs,
                                 self.absorption_value, self.fixed_factor, self.scale_n,
                                 self.scale_first, self.exponent_kind, self.exponent_n,
                                 self.exponent_first, full, g)
        return g


ARRAY_GRIDS = ("decay", "absorption", "modulation")  # kernels/array_family.py's order


def _array_grids(model):
    """{grid position: component} of an array model whose components are all configured
    smoothed grids (or the analytical factor), else None."""
    components = getattr(model, "components", None)
    if not components or getattr(model, "id_", None) != "array":
        return None
    grids = {}
    for name, comp in components.items():
        if name == "analytical":
            continue
        smoother = getattr(comp, "_smoother", None)
        if name not in ARRAY_GRIDS or smoother is None or \
                len(smoother.coordinates) != GRID_AXES[ARRAY_GRIDS.index(name)]:
            return None
        grids[ARRAY_GRIDS.index(name)] = comp
    return grids or None


class ArrayFamily:
    """Array models (smoothed grids) of several datasets: g and the ELL derivatives of every
    row in one kernel call, the smoother weights computed inline from each row's
    coordinates (kernels/array_family.py). Datasets may have different grids."""

    @staticmethod
    def applies(models) -> bool:
        return bool(models) and all(_array_grids(m) is not None for m in models)

    def __init__(self, models, column_of_parameter, row_dataset, local_row):
        row_dataset = np.ascontiguousarray(row_dataset, dtype=np.int64)
        local_row = np.asarray(local_row, dtype=np.int64)
        grids = [_array_grids(m) for m in models]
        present = sorted({c for g in grids for c in g})
        self.slot_start = np.full(N_GRIDS, -1, dtype=np.int64)
        self.coordinate_start = np.zeros(N_GRIDS, dtype=np.int64)
        slots = columns = 0
        for c in present:
            self.slot_start[c], self.coordinate_start[c] = slots, columns
            slots += int(GRID_SLOTS[c])
            columns += int(GRID_AXES[c])
        self.n_slots = slots
        offsets = np.concatenate([[0], np.cumsum([m.n_parameters for m in models])]).astype(
            np.int64)
        self.grid_shape = np.zeros((len(models), N_GRIDS, 3), dtype=np.int64)
        self.grid_first = np.zeros((len(models), N_GRIDS), dtype=np.int64)
        self.coordinates = np.zeros((row_dataset.size, columns))
        self.fixed_factor = None
        for d, (model, obs) in enumerate(zip(models, split_positions(row_dataset,
                                                                     len(models)))):
            rows = local_row[obs]
            slices = model.parameter_slices()
            for c, comp in grids[d].items():
                shape = tuple(comp.shape) + (1,) * (3 - len(comp.shape))
                self.grid_shape[d, c] = shape
                self.grid_first[d, c] = offsets[d] + slices[ARRAY_GRIDS[c]].start
                for axis, z in enumerate(comp._smoother.coordinates):
                    self.coordinates[obs, self.coordinate_start[c] + axis] = z[rows]
            if "analytical" in model.components:
                if self.fixed_factor is None:
                    self.fixed_factor = np.ones(row_dataset.size)
                self.fixed_factor[obs] = model.components["analytical"].values(rows=rows)
        self.row_dataset = row_dataset
        self.free_col_of_full = np.concatenate(
            [np.asarray(c, dtype=np.int32) for c in column_of_parameter])
        self.base = np.concatenate([np.asarray(m.parameter_vector(), dtype=np.float64)
                                    for m in models])
        self.free_entries = np.flatnonzero(self.free_col_of_full >= 0)
        self.free_of_entry = self.free_col_of_full[self.free_entries]

    def parameters(self, x):
        full = self.base.copy()
        full[self.free_entries] = np.asarray(x, dtype=np.float64)[self.free_of_entry]
        return full

    def _arrays(self):
        return (self.row_dataset, self.coordinates, self.grid_shape, self.grid_first,
                self.coordinate_start, self.slot_start, self.n_slots, self.fixed_factor)

    def evaluate(self, x):
        return evaluate_array_family(*self._arrays(), self.parameters(x),
                                     self.free_col_of_full)

    def evaluate_g(self, x):
        return evaluate_array_family_g(*self._arrays(), self.parameters(x))


class DatasetByDataset:
    """Models of no family: each dataset's model evaluates its rows, and the
    results are placed in row order (one concatenation and one gather)."""

    def __init__(self, manager, datasets, row_dataset, local_row):
        self.manager = manager
        self.datasets = list(datasets)
        self.row_dataset = np.asarray(row_dataset, dtype=np.int64)
        self.rows = []
        self.position = np.empty(self.row_dataset.size, dtype=np.int64)
        local_row = np.asarray(local_row)
        for obs in split_positions(self.row_dataset, len(self.datasets)):
            unique_rows, inverse = np.unique(local_row[obs], return_inverse=True)
            self.rows.append(unique_rows)
            self.position[obs] = inverse

    def _per_dataset(self, x):
        self.manager.set_free(x)
        return [self.manager.evaluate_dataset(d, rows)
                for d, rows in zip(self.datasets, self.rows)]

    def evaluate(self, x):
        from .parameters import gather_ell

        return gather_ell(self._per_dataset(x), self.row_dataset, self.position)

    def evaluate_g(self, x):
        self.manager.set_free(x)
        from .parameters import evaluate_rows

        per_dataset = [np.asarray(evaluate_rows(self.manager.models[d], rows)[0],
                                  dtype=np.float64)
                       for d, rows in zip(self.datasets, self.rows)]
        return gather_by_dataset(per_dataset, self.row_dataset, self.position)


def family_key(model):
    if hasattr(model, "family_description"):
        return ("KB",)
    if hasattr(model, "pass_inputs"):
        return ("smooth rotation", absorption_width(model))
    if _array_grids(model) is not None:
        return ("array",)
    return ("dataset by dataset",)


class ModelFamilies:
    """g and its ELL derivatives over the free parameters for given rows of the datasets of
    a ParameterManager: one kernel call per model family present, whatever the number of
    datasets (a job may mix families: KB for some datasets, physical for others).

    row_dataset, local_row: per row its dataset (position in manager.models) and its row
    among the rows that dataset's model was configured with. Datasets without rows are left
    out. smooth_inputs: the fused pass's inputs of exactly these rows, to be shared.
    g_only: only evaluate_g will be asked for, at the models' current parameters (physical
    and dose_decay then use SmoothRotationGFamily).
    """

    def __init__(self, manager, row_dataset, local_row, smooth_inputs=None, g_only=False):
        self.manager = manager
        row_dataset = np.asarray(row_dataset, dtype=np.int64)
        local_row = np.asarray(local_row, dtype=np.int64)
        self.n_rows = int(row_dataset.size)
        models = manager.models
        present = np.bincount(row_dataset, minlength=len(models)) > 0
        keys = {}
        family_of_dataset = np.full(len(models), -1, dtype=np.int64)
        for d in np.flatnonzero(present):
            key = family_key(models[d])
            family_of_dataset[d] = keys.setdefault(key, len(keys))
        self.families = []  # (family, its rows in this row order or None for all)
        for key, f in keys.items():
            datasets = np.flatnonzero(family_of_dataset == f)
            if len(keys) == 1:
                rows, sub_dataset, sub_local = None, row_dataset, local_row
            else:
                rows = np.flatnonzero(family_of_dataset[row_dataset] == f)
                sub_dataset, sub_local = row_dataset[rows], local_row[rows]
            renumber = np.full(len(models), -1, dtype=np.int64)
            renumber[datasets] = np.arange(datasets.size)
            sub_dataset = renumber[sub_dataset]
            members = [models[d] for d in datasets]
            columns = [manager.column_of_parameter[d] for d in datasets]
            if key[0] == "KB":
                family = KBFamily(members, columns, sub_dataset, sub_local)
            elif key[0] == "smooth rotation" and g_only:
                family = SmoothRotationGFamily(members, columns, sub_dataset, sub_local)
            elif key[0] == "smooth rotation":
                family = SmoothRotationFamily(
                    members, columns, sub_dataset, sub_local,
                    smooth_inputs if len(keys) == 1 and present.all() else None)
            elif key[0] == "array":
                family = ArrayFamily(members, columns, sub_dataset, sub_local)
            else:
                family = DatasetByDataset(manager, datasets, sub_dataset, sub_local)
            self.families.append((family, rows))

    def evaluate(self, x):
        """(g (n,), deriv_values (n, K), deriv_col (n, K) int32), K the widest family's."""
        x = np.asarray(x, dtype=np.float64)
        if len(self.families) == 1:
            return self.families[0][0].evaluate(x)
        parts = [(family.evaluate(x), rows) for family, rows in self.families]
        k = max((values.shape[1] for (_, values, _), _ in parts), default=0)
        g = np.empty(self.n_rows)
        values = np.zeros((self.n_rows, k))
        cols = np.full((self.n_rows, k), -1, dtype=np.int32)
        for (g_f, values_f, cols_f), rows in parts:
            g[rows] = g_f
            values[rows, :values_f.shape[1]] = values_f
            cols[rows, :cols_f.shape[1]] = cols_f
        return g, values, cols

    def evaluate_variance(self, x, covariance, variance_of_g):
        """(g (n,), var(g) (n,)) at x: variance_of_g(values, cols, covariance) of the ELL
        derivatives, or the family's fused kernel where it has one (the same values)."""
        x = np.asarray(x, dtype=np.float64)
        if len(self.families) == 1 and hasattr(self.families[0][0], "evaluate_variance"):
            return self.families[0][0].evaluate_variance(x, covariance)
        g, values, cols = self.evaluate(x)
        return g, variance_of_g(values, cols, covariance)

    def evaluate_g(self, x):
        x = np.asarray(x, dtype=np.float64)
        if len(self.families) == 1:
            return self.families[0][0].evaluate_g(x)
        g = np.empty(self.n_rows)
        for family, rows in self.families:
            g[rows] = family.evaluate_g(x)
        return g


# Rows per block when every configured row is evaluated (expand): the per-row model inputs
# and the ELL table of a block are transients, never arrays of all observations: g alone
# needs ~70 B per row (~19 MB a block; fewer blocks, less per-block set-up), derivatives
# with absorption ~600 B per row (a 64k-row derivative block with absorption was a 47 MB
# transient and the peak of a 1e6 run).
# (DERIVATIVE_BLOCK_ROWS, kernels/physical_family.py, is the derivative blocks' size.)
G_BLOCK_ROWS = 262144


def evaluate_all_rows(manager, sizes, covariance=None, variance_of_g=None):
    """g of every configured row of every dataset of the manager, concatenated in dataset
    order (sizes[d]: dataset d's configured rows), and var(g) = diag(J C J^T) when a
    covariance C over the manager's free parameters is given (variance_of_g(values, cols, C)
    computes it from the ELL derivatives). Blocks of rows cross dataset boundaries: one
    family call per block, not one model evaluation per dataset."""
    sizes = np.asarray(sizes, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(bounds[-1])
    x = manager.get_free()
    g = np.empty(n)
    var_g = None if covariance is None else np.empty(n)
    block = G_BLOCK_ROWS if covariance is None else DERIVATIVE_BLOCK_ROWS
    for start in range(0, n, block):
        stop = min(n, start + block)
        flat = np.arange(start, stop, dtype=np.int64)
        row_dataset = np.searchsorted(bounds, flat, side="right") - 1
        families = ModelFamilies(manager, row_dataset, flat - bounds[row_dataset],
                                 g_only=covariance is None)
        if covariance is None:
            g[start:stop] = families.evaluate_g(x)
        else:
            g[start:stop], var_g[start:stop] = families.evaluate_variance(x, covariance,
                                                                          variance_of_g)
    return g, var_g
