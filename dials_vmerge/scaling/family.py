"""Model families evaluated for all their datasets at once over the rows of one IhTable.

A family gathers, once per table, each row's inputs from the datasets' models (row-level
arrays in the table's order) and, per dataset, where its parameters sit in the global free
vector; every later evaluation is then one kernel call over all rows, whatever the number
of datasets. KB is such a family; physical models have their fused pass (physical_pass.py).
"""

from __future__ import annotations

import numpy as np

from ..kernels.flat import gather_by_dataset
from ..kernels.kb_family import evaluate_kb_family, evaluate_kb_family_g


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
