"""Device gathers and per-row formulas over device-resident columns (backends.cuda_job_table).

A job's observation arrays stay on the device in the job's row order; each pass's table (rows
in group order) is gathered there through its layout's row order, so a new table costs no
copy over the bus once the layout's order is resident.
"""

from __future__ import annotations

from numba import cuda


@cuda.jit
def gather_kernel(source, order, out):
    """out[i] = source[order[i]]."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = source[order[i]]


@cuda.jit
def job_rows_kernel(row_offset, dataset_id, loc_index, out):
    """out[i] = row_offset[dataset_id[i]] + loc_index[i]: a table row's row in the job."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = row_offset[dataset_id[i]] + loc_index[i]


@cuda.jit
def error_model_weight_kernel(intensity, variance, row_dataset, a, b, has_model, out):
    """Minimisation weights 1 / sigma'^2 per row (twin of scaling.error_model
    .error_model_weights): sigma'^2 = a^2 (variance + (b I)^2) where the row's dataset has an
    error model, the variance itself otherwise."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        d = row_dataset[i]
        if has_model[d] != 0:
            t = b[d] * intensity[i]
            out[i] = 1.0 / ((a[d] * a[d]) * (variance[i] + t * t))
        else:
            out[i] = 1.0 / variance[i]
