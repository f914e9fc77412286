"""One free-parameter vector over the models of several datasets (concurrent refinement).

The only coupling to dials_vmerge.model is the ScalingModel interface:
  parameter_vector() -> (P,), set_parameter_vector(p), free_parameter_mask() -> (P,) bool,
  restraint_weights() -> (P,), configure(table, experiment),
  evaluate() -> (g (n,), deriv_values (n,K) float64, deriv_index (n,K) int32)
with deriv_index indexing the model's full parameter vector. Used when present:
  supports_fix_initial + free_parameter_mask(fix_initial=True) (the first scale parameter,
  fixed in the last full-matrix iteration), evaluate(rows=...) (a subset of the configured
  rows), set_est_standard_devs(esds (P,)).

Free parameters get global columns dataset by dataset in the order of the model list (DIALS
concurrent order); a component shared by all models (shared_component()) has one set of
columns, those of the first dataset.
"""

from __future__ import annotations

import numpy as np


class ParameterManager:
    def __init__(self, models, fix_initial_dataset=None):
        """fix_initial_dataset: the dataset whose first scale parameter is held fixed.

        A component every model reports as shared (shared_component(), e.g. physical
        share.absorption) gets one set of columns used by all datasets; its restraint
        weights add up over the datasets, as DIALS's summed restraint gradients do.
        """
        self.models = list(models)
        self.column_of_parameter = []  # per dataset: full index -> global column or -1
        self.free_index = []  # per dataset: full indices of the free parameters
        self.free_columns = []  # per dataset: the global column of each free parameter
        shared = self._shared_name()
        shared_columns = None
        offset = 0
        for d, model in enumerate(self.models):
            if d == fix_initial_dataset:
                mask = np.asarray(model.free_parameter_mask(fix_initial=True), dtype=bool)
            else:
                mask = np.asarray(model.free_parameter_mask(), dtype=bool)
            col = np.full(mask.size, -1, dtype=np.int32)
            shared_slice = model.parameter_slices()[shared] if shared else None
            for j in np.flatnonzero(mask):
                if shared_slice is not None and shared_slice.start <= j < shared_slice.stop \
                        and shared_columns is not None:
                    col[j] = shared_columns[j - shared_slice.start]
                else:
                    col[j] = offset
                    offset += 1
            if shared_slice is not None and shared_columns is None:
                shared_columns = col[shared_slice].copy()
            free = np.flatnonzero(mask)
            self.column_of_parameter.append(col)
            self.free_index.append(free)
            self.free_columns.append(col[free].astype(np.int64))
        self.n_free = offset

    def _shared_name(self):
        names = [m.shared_component() if hasattr(m, "shared_component") else None
                 for m in self.models]
        if len(self.models) > 1 and names[0] is not None and all(n == names[0] for n in names):
            return names[0]
        return None

    def get_free(self):
        x = np.zeros(self.n_free)
        for model, free, cols in zip(self.models, self.free_index, self.free_columns):
            x[cols] = np.asarray(model.parameter_vector(), dtype=np.float64)[free]
        return x

    def set_free(self, x):
        for model, free, cols in zip(self.models, self.free_index, self.free_columns):
            p = np.array(model.parameter_vector(), dtype=np.float64)
            p[free] = x[cols]
            model.set_parameter_vector(p)

    def restraint_weights(self):
        w = np.zeros(self.n_free)
        for model, free, cols in zip(self.models, self.free_index, self.free_columns):
            np.add.at(w, cols, np.asarray(model.restraint_weights(), dtype=np.float64)[free])
        return w

    def full_vector(self, d, free_values, fill=0.0):
        """A dataset's full-length vector from values over the free columns (e.g. ESDs)."""
        out = np.full(len(self.column_of_parameter[d]), fill, dtype=np.float64)
        out[self.free_index[d]] = free_values[self.free_columns[d]]
        return out

    def evaluate(self, rows=None):
        """Per dataset (g, deriv_values, deriv_col) with columns in the global free vector.

        rows: optional per-dataset row selections of the configured observations.
        """
        out = []
        for d, (model, col) in enumerate(zip(self.models, self.column_of_parameter)):
            if rows is None or rows[d] is None:
                g, values, index = model.evaluate()
            else:
                g, values, index = evaluate_rows(model, rows[d])
            values = np.asarray(values, dtype=np.float64)
            index = np.asarray(index)
            global_col = np.where(index >= 0, col[np.clip(index, 0, None)], -1).astype(np.int32)
            out.append((np.asarray(g, dtype=np.float64), values, global_col))
        return out


    def evaluate_dataset(self, d, rows):
        """(g, deriv_values, deriv_col) of dataset d for `rows` of its configured rows."""
        g, values, index = evaluate_rows(self.models[d], rows)
        col = self.column_of_parameter[d]
        index = np.asarray(index)
        global_col = np.where(index >= 0, col[np.clip(index, 0, None)], -1).astype(np.int32)
        return np.asarray(g, dtype=np.float64), np.asarray(values, dtype=np.float64), global_col

    def full_to_free(self):
        """Per entry of the concatenated full parameter vectors: its free column or -1."""
        return np.concatenate(self.column_of_parameter).astype(np.int64) if self.models else \
            np.zeros(0, np.int64)


def gather_ell(per_dataset, dataset_id, loc_index):
    """Stack per-dataset (g, values, cols) into observation order of an IhTable.

    Datasets with fewer derivative slots are padded with unused slots (col -1). One
    concatenation and one gather (kernels.flat), not a scan of all rows per dataset.
    """
    from ..kernels.flat import gather_by_dataset

    n_slots = max((v.shape[1] for _, v, _ in per_dataset), default=0)

    def padded(array, fill, dtype):
        if array.shape[1] == n_slots:
            return array
        out = np.full((array.shape[0], n_slots), fill, dtype=dtype)
        out[:, :array.shape[1]] = array
        return out

    g = gather_by_dataset([gd for gd, _, _ in per_dataset], dataset_id, loc_index)
    values = gather_by_dataset([padded(vd, 0.0, np.float64) for _, vd, _ in per_dataset],
                               dataset_id, loc_index)
    cols = gather_by_dataset([padded(cd, -1, np.int32) for _, _, cd in per_dataset],
                             dataset_id, loc_index, dtype=np.int32)
    return g, values.reshape(-1, n_slots), cols.reshape(-1, n_slots)


def evaluate_rows(model, rows):
    """model.evaluate(rows=rows) where supported, else evaluate everything and select."""
    try:
        return model.evaluate(rows=rows)
    except TypeError:
        g, values, index = model.evaluate()
        return g[rows], values[rows], index[rows]


def first_fix_initial_dataset(models):
    """The first dataset whose model supports fixing its initial scale parameter (DIALS)."""
    for d, model in enumerate(models):
        if getattr(model, "supports_fix_initial", False):
            return d
    return None
