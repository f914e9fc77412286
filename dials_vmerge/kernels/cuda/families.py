"""Jobs whose datasets use several model families (KB stills and physical sweeps, physical
sweeps with and without absorption, array models): each family's device model kernel
(kernels.cuda.models, kernels.cuda.array) runs over that family's rows only, and its g and
ELL derivative slots are scattered into the job's combined g and (n, K) derivative table
(K the widest family's; a narrower family's extra slots keep column -1 and value 0), so the
target, normal-equation and var(g) kernels read one table as for a single family.

The rows of each family are found on the device from the table's job rows: a thread per
row finds its dataset by a binary search of the job's dataset offsets (its family and its
row in the family's job-order inputs follow from per-dataset arrays), then per family a
compaction over fixed chunks (count, serial scan of the chunk totals, fill in row order:
kernels.cuda.resident_rows' scheme) lists the family's table positions in table order.
Integer arithmetic in a fixed order: no atomics, the same arrays whatever the launch shape.
"""

from __future__ import annotations

from numba import cuda


@cuda.jit
def scatter_kernel(source, positions, out):
    """out[positions[i]] = source[i] (a family's g into the job's g)."""
    for i in range(cuda.grid(1), positions.shape[0], cuda.gridsize(1)):
        out[positions[i]] = source[i]


@cuda.jit
def scatter_rows_kernel(source, positions, out):
    """out[positions[i], k] = source[i, k] for the source's slots (a family's derivative
    values or ELL columns into the job's wider table)."""
    for i in range(cuda.grid(1), positions.shape[0], cuda.gridsize(1)):
        p = positions[i]
        for k in range(source.shape[1]):
            out[p, k] = source[i, k]


@cuda.jit
def fill_rows_kernel(out, value):
    """Every entry of a 2-D array set to value (the combined table's unused slots)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        for k in range(out.shape[1]):
            out[i, k] = value


@cuda.jit
def arange_kernel(start, out):
    """out[i] = start + i (a chunk of consecutive job rows)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = start + i


@cuda.jit
def row_family_kernel(order, job_offsets, dataset_family, dataset_local_start, family,
                      local_row):
    """Per table row (job row order[i]): its family and its row in the family's job-order
    inputs. job_offsets: each dataset's first job row, then the number of job rows; the
    dataset is the last one whose first row is <= the row (empty datasets skipped)."""
    n_sets = job_offsets.shape[0] - 1
    for i in range(cuda.grid(1), order.shape[0], cuda.gridsize(1)):
        r = order[i]
        lo = 0
        hi = n_sets
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if job_offsets[mid] <= r:
                lo = mid
            else:
                hi = mid
        family[i] = dataset_family[lo]
        local_row[i] = dataset_local_start[lo] + r - job_offsets[lo]


@cuda.jit
def family_count_kernel(family, f, chunk, counts):
    """Thread per chunk of rows: how many belong to family f."""
    n = family.shape[0]
    for c in range(cuda.grid(1), counts.shape[0], cuda.gridsize(1)):
        total = 0
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            if family[i] == f:
                total += 1
        counts[c] = total


@cuda.jit
def family_fill_kernel(family, local_row, f, chunk, chunk_offset, positions, source):
    """Thread per chunk: family f's rows (table positions and rows of its job-order inputs)
    at their places, in row order."""
    n = family.shape[0]
    for c in range(cuda.grid(1), chunk_offset.shape[0] - 1, cuda.gridsize(1)):
        at = chunk_offset[c]
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            if family[i] == f:
                positions[at] = i
                source[at] = local_row[i]
                at += 1
