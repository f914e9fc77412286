"""A scaling round's minimisation table derived on the device from the job's resident columns.

The job's group sort (its row order in group order and group offsets) and the model's
per-row inputs stay on the device in job row order for the whole job (backends
.cuda_resident_inputs). A round's table is a subset of those rows (selected and not
outliers): from a keep flag per job row (one byte, uploaded only when the subset changes)
these kernels derive, on the device, the table's rows in group order, its group offsets and
the gradient's column entries (the index arrays kernels.cuda.target's gradient pass reads),
so no array with a row per observation crosses the bus for a round's table.

Every derivation is integer arithmetic in a fixed order (prefix sums over fixed chunks, a
serial scan of the chunk totals, each chunk written by one thread in row order): the same
arrays as the host's (scaling.ih_table.GroupLayout.subset; kernels.cuda.target
.column_entries) whatever the launch shape. No atomics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK, blocks


# -- gathers and per-row columns ----------------------------------------------------------
@cuda.jit
def gather_rows_kernel(source, order, out):
    """out[i, k] = source[order[i], k] (a 2-D per-row input)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        r = order[i]
        for k in range(out.shape[1]):
            out[i, k] = source[r, k]


@cuda.jit
def kb_columns_kernel(row_dataset, scale_col, decay_col, cols):
    """ELL columns of the KB family (twin of kernels.cuda.models.kb_family_columns)."""
    for i in range(cuda.grid(1), cols.shape[0], cuda.gridsize(1)):
        d = row_dataset[i]
        cols[i, 0] = scale_col[d]
        cols[i, 1] = decay_col[d]


@cuda.jit
def physical_columns_kernel(first_param, absorption_first, has_abs, cols):
    """ELL columns of the physical layout in the full vector (twin of
    kernels.cuda.models.physical_columns)."""
    for i in range(cuda.grid(1), cols.shape[0], cuda.gridsize(1)):
        for j in range(3):
            cols[i, j] = first_param[i, 0] + j
            cols[i, 3 + j] = first_param[i, 1] + j
        if has_abs:
            a0 = absorption_first[i]
            for k in range(cols.shape[1] - 6):
                cols[i, 6 + k] = a0 + k


@cuda.jit
def map_columns_kernel(cols, column_map, out):
    """out = column_map[cols] where cols >= 0, else -1 (full vector -> free columns)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        for k in range(out.shape[1]):
            c = cols[i, k]
            out[i, k] = column_map[c] if c >= 0 else -1


@cuda.jit
def sample_kernel(source, out):
    """out[j] = source[(j (n - 1)) // (m - 1)]: m entries spread over source (n entries,
    first and last included), to check a derived array against the host's."""
    n, m = source.shape[0], out.shape[0]
    for j in range(cuda.grid(1), m, cuda.gridsize(1)):
        out[j] = source[(j * (n - 1)) // max(m - 1, 1)]


def sample_positions(n, m):
    """The positions sample_kernel reads: m of n (host twin of its formula)."""
    m = min(int(m), int(n))
    return (np.arange(m, dtype=np.int64) * (int(n) - 1)) // max(m - 1, 1)


def sample(source, m):
    """m entries spread over device array source, on the host (only they come back)."""
    m = min(int(m), int(source.shape[0]))
    out = cuda.device_array(max(m, 1), source.dtype)
    if m:
        sample_kernel[blocks(m), THREADS_PER_BLOCK](source, out[:m])
    return out[:m].copy_to_host()


@cuda.jit
def shift_kernel(values, offset, out):
    """out[i] = values[i] - offset (a batch's group offsets from the table's)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = values[i] - offset


# -- integer prefix sums -----------------------------------------------------------------
@cuda.jit
def exclusive_scan_kernel(values, out):
    """One thread: out[0] = 0, out[j + 1] = out[j] + values[j] (the chunk totals, few)."""
    if cuda.grid(1) == 0:
        total = 0
        for j in range(values.shape[0]):
            out[j] = total
            total += values[j]
        out[values.shape[0]] = total


@cuda.jit
def kept_count_kernel(keep, layout_order, chunk, counts):
    """Thread per chunk of the layout's rows (in group order): how many are kept."""
    n = layout_order.shape[0]
    for c in range(cuda.grid(1), counts.shape[0], cuda.gridsize(1)):
        total = 0
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            if keep[layout_order[i]] != 0:
                total += 1
        counts[c] = total


@cuda.jit
def compact_rows_kernel(keep, layout_order, chunk, chunk_offset, table_order, table_position):
    """Thread per chunk: the kept rows' job rows into table_order at their positions, and
    table_position[i] = how many kept rows precede layout row i (n + 1 entries)."""
    n = layout_order.shape[0]
    n_chunks = chunk_offset.shape[0] - 1
    for c in range(cuda.grid(1), n_chunks, cuda.gridsize(1)):
        position = chunk_offset[c]
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            table_position[i] = position
            row = layout_order[i]
            if keep[row] != 0:
                table_order[position] = row
                position += 1
        if c == n_chunks - 1:
            table_position[n] = position


@cuda.jit
def group_count_kernel(layout_group_start, table_position, chunk, counts):
    """Thread per chunk of the layout's groups: how many keep a row."""
    n_groups = layout_group_start.shape[0] - 1
    for c in range(cuda.grid(1), counts.shape[0], cuda.gridsize(1)):
        total = 0
        for grp in range(c * chunk, min(n_groups, (c + 1) * chunk)):
            if table_position[layout_group_start[grp + 1]] > \
                    table_position[layout_group_start[grp]]:
                total += 1
        counts[c] = total


@cuda.jit
def compact_groups_kernel(layout_group_start, table_position, chunk, chunk_offset,
                          table_group_start):
    """Thread per chunk of groups: the first table row of each group that keeps a row;
    the chunk holding the last group closes the offsets with the number of table rows."""
    n_groups = layout_group_start.shape[0] - 1
    n_chunks = chunk_offset.shape[0] - 1
    for c in range(cuda.grid(1), n_chunks, cuda.gridsize(1)):
        at = chunk_offset[c]
        for grp in range(c * chunk, min(n_groups, (c + 1) * chunk)):
            lo = table_position[layout_group_start[grp]]
            if table_position[layout_group_start[grp + 1]] > lo:
                table_group_start[at] = lo
                at += 1
        if c == n_chunks - 1:
            table_group_start[at] = table_position[layout_group_start[n_groups]]


def _chunking(n):
    """(chunk length, number of chunks) of a scan over n items: about sqrt(n) of each, so
    both the per-chunk loops and the serial scan of chunk totals stay short."""
    chunk = max(64, int(math.isqrt(max(int(n), 1))) + 1)
    return chunk, max(1, -(-int(n) // chunk))


def _exclusive_chunk_offsets(count_kernel, args, n):
    chunk, n_chunks = _chunking(n)
    counts = cuda.device_array(n_chunks, np.int64)
    count_kernel[blocks(n_chunks), THREADS_PER_BLOCK](*args, chunk, counts)
    offsets = cuda.device_array(n_chunks + 1, np.int64)
    exclusive_scan_kernel[1, 1](counts, offsets)
    return chunk, offsets


def subset_table(keep, layout_order, layout_group_start):
    """(table_order, table_group_start, n_rows, n_groups) on the device: the kept job rows
    (keep: uint8 per job row) in the layout's group order, and the offsets of the groups that
    keep a row (GroupLayout.subset's order and group_start). Only the two counts come back."""
    n = int(layout_order.shape[0])
    n_layout_groups = int(layout_group_start.shape[0]) - 1
    chunk, offsets = _exclusive_chunk_offsets(kept_count_kernel, (keep, layout_order), n)
    n_rows = int(offsets[offsets.shape[0] - 1:].copy_to_host()[0])
    table_order = cuda.device_array(max(n_rows, 1), np.int64)
    table_position = cuda.device_array(n + 1, np.int64)
    compact_rows_kernel[blocks(offsets.shape[0] - 1), THREADS_PER_BLOCK](
        keep, layout_order, chunk, offsets, table_order, table_position)
    g_chunk, g_offsets = _exclusive_chunk_offsets(
        group_count_kernel, (layout_group_start, table_position), n_layout_groups)
    n_groups = int(g_offsets[g_offsets.shape[0] - 1:].copy_to_host()[0])
    table_group_start = cuda.device_array(n_groups + 1, np.int64)
    compact_groups_kernel[blocks(g_offsets.shape[0] - 1), THREADS_PER_BLOCK](
        layout_group_start, table_position, g_chunk, g_offsets, table_group_start)
    return table_order[:n_rows], table_group_start, n_rows, n_groups


# -- the gradient's column entries -------------------------------------------------------
# Rows per fine chunk aimed at (a thread's serial work: its rows' slots), the entries of the
# (column, fine chunk) count table allowed (8 B each; it becomes the fill's cursors), and
# the most slots (plus columns zeroed) one thread may visit: a layout needing more (few
# segments and many columns, e.g. 1e7 observations of 4e4 KB stills in one batch) gets its
# column entries from the host (column_entries_on_device: None), as without a resident
# table.
ENTRY_CHUNK_ROWS = 256
ENTRY_COUNT_BUDGET = 1 << 24
MAX_SERIAL_SLOTS = 1 << 16


@cuda.jit(device=True)
def _fine_chunk_rows(f, n_obs, n_segments, per_segment):
    s = f // per_segment
    j = f - s * per_segment
    seg_lo = (s * n_obs) // n_segments
    seg_len = ((s + 1) * n_obs) // n_segments - seg_lo
    return (seg_lo + (j * seg_len) // per_segment,
            seg_lo + ((j + 1) * seg_len) // per_segment)


@cuda.jit
def chunk_column_count_kernel(cols, n_segments, per_segment, counts):
    """Thread per fine chunk f (segment f // per_segment, split in per_segment equal parts):
    counts[c, f] = the used ELL slots of column c in its rows."""
    n_obs = cols.shape[0]
    n_params = counts.shape[0]
    for f in range(cuda.grid(1), counts.shape[1], cuda.gridsize(1)):
        for c in range(n_params):
            counts[c, f] = 0
        lo, hi = _fine_chunk_rows(f, n_obs, n_segments, per_segment)
        for obs in range(lo, hi):
            for k in range(cols.shape[1]):
                c = cols[obs, k]
                if c >= 0:
                    counts[c, f] += 1


@cuda.jit
def column_scan_kernel(counts, totals):
    """Thread per column: counts[c, :] -> its exclusive prefix sums in place; totals[c] =
    the column's entries."""
    for c in range(cuda.grid(1), counts.shape[0], cuda.gridsize(1)):
        total = 0
        for f in range(counts.shape[1]):
            value = counts[c, f]
            counts[c, f] = total
            total += value
        totals[c] = total


@cuda.jit
def entry_offset_kernel(counts, column_start, per_segment, entry_offset):
    """Thread per (column, segment bound): entry_offset[c, s] = the column's first entry
    in segment s (s = S: its end), counts holding the columns' exclusive prefix sums."""
    n_params = entry_offset.shape[0]
    n_bounds = entry_offset.shape[1]
    for idx in range(cuda.grid(1), n_params * n_bounds, cuda.gridsize(1)):
        c = idx // n_bounds
        s = idx - c * n_bounds
        if s < n_bounds - 1:
            entry_offset[c, s] = column_start[c] + counts[c, s * per_segment]
        else:
            entry_offset[c, s] = column_start[c + 1]


@cuda.jit
def add_column_start_kernel(counts, column_start):
    """counts[c, f] += column_start[c]: each fine chunk's first entry of each column (the
    fill's cursors)."""
    n_params, n_chunks = counts.shape[0], counts.shape[1]
    for idx in range(cuda.grid(1), n_params * n_chunks, cuda.gridsize(1)):
        c = idx // n_chunks
        counts[c, idx - c * n_chunks] += column_start[c]


@cuda.jit
def chunk_column_fill_kernel(cols, n_segments, per_segment, cursor, entry_flat):
    """Thread per fine chunk: each used slot's flat position obs * K + slot at its column's
    next entry (cursor: the chunk's first entry per column; positions ascending)."""
    n_obs = cols.shape[0]
    n_slots = cols.shape[1]
    for f in range(cuda.grid(1), cursor.shape[1], cuda.gridsize(1)):
        lo, hi = _fine_chunk_rows(f, n_obs, n_segments, per_segment)
        for obs in range(lo, hi):
            for k in range(n_slots):
                c = cols[obs, k]
                if c >= 0:
                    entry_flat[cursor[c, f]] = obs * n_slots + k
                    cursor[c, f] += 1


def entry_chunking(n_obs, n_slots, n_params, n_segments):
    """Fine chunks per gradient segment, or None when a thread would visit more than
    MAX_SERIAL_SLOTS slots within the count budget (then the host derives the entries)."""
    n_obs, n_params, n_segments = int(n_obs), max(int(n_params), 1), int(n_segments)
    if n_params * n_segments > ENTRY_COUNT_BUDGET:
        return None
    rows = -(-n_obs // n_segments)
    wanted = max(1, -(-rows // ENTRY_CHUNK_ROWS))
    allowed = max(1, ENTRY_COUNT_BUDGET // (n_params * n_segments))
    per_segment = min(wanted, allowed)
    # a chunk's thread zeroes its count of every column, then visits its rows' slots
    if -(-rows // per_segment) * int(n_slots) + n_params > MAX_SERIAL_SLOTS:
        return None
    return per_segment


def column_entries_on_device(cols, n_params, n_segments):
    """(entry_flat, entry_offset (n_params, n_segments + 1)) of the gradient pass from
    device ELL columns cols (n, K), segments of equal length (segment_bounds): the host's
    column_entries exactly, made on the device; None when the layout's shape would make a
    thread's serial share too long (entry_chunking)."""
    n_params, n_segments = int(n_params), int(n_segments)
    per_segment = entry_chunking(cols.shape[0], cols.shape[1], n_params, n_segments)
    if per_segment is None:
        return None
    n_chunks = n_segments * per_segment
    counts = cuda.device_array((n_params, n_chunks), np.int64)
    chunk_column_count_kernel[blocks(n_chunks), THREADS_PER_BLOCK](cols, n_segments,
                                                                    per_segment, counts)
    totals = cuda.device_array(n_params, np.int64)
    column_scan_kernel[blocks(n_params), THREADS_PER_BLOCK](counts, totals)
    column_start = cuda.device_array(n_params + 1, np.int64)
    exclusive_scan_kernel[1, 1](totals, column_start)
    entry_offset = cuda.device_array((n_params, n_segments + 1), np.int64)
    entry_offset_kernel[blocks(n_params * (n_segments + 1)), THREADS_PER_BLOCK](
        counts, column_start, per_segment, entry_offset)
    add_column_start_kernel[blocks(n_params * n_chunks), THREADS_PER_BLOCK](counts,
                                                                           column_start)
    # the number of used slots (the scan's total) is the one value that comes back
    n_entries = int(column_start[n_params:].copy_to_host()[0])
    entry_flat = cuda.device_array(max(n_entries, 1), np.int64)
    chunk_column_fill_kernel[blocks(n_chunks), THREADS_PER_BLOCK](
        cols, n_segments, per_segment, counts, entry_flat)
    return entry_flat, entry_offset
