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
# The entries are the used ELL slots (flat positions obs * K + slot) sorted by column, stably
# (positions ascending within a column): the host's counting sort (kernels.cuda.target
# .column_entries). On the device a counting sort by a digit of the column over fine chunks
# of rows: a thread per chunk counts its slots per digit value, a thread per digit value
# turns the (digit x chunk) counts into prefix sums along the chunks, a thread per chunk
# writes its slots at its digit cursors in row order. No atomics; integer arithmetic in a
# fixed order, so the arrays do not depend on the launch shape. Two plans (entry_plan):
# - "segments": one pass, the whole column the digit, the chunks cut inside the gradient
#   segments, so each segment's first entry per column is read off the count table (many
#   segments, columns few enough for a (column x chunk) table: the common shape);
# - "radix": few segments and many columns (e.g. 1e7 observations of 4e4 KB stills in one
#   batch: one segment, 8e4 columns), where that table or a thread's share would be too
#   large: a least-significant-digit radix sort of `bits` of the column per pass (each pass
#   stable, so the last leaves column order, then position), each segment's first entry per
#   column found by a binary search of the sorted (column, position) pairs.
# Rows per fine chunk aimed at (a thread's serial work: its rows' slots), the entries of the
# count table allowed (8 B each; it becomes the fill's cursors), and the most slots (plus
# counts zeroed) one thread may visit.
ENTRY_CHUNK_ROWS = 256
ENTRY_COUNT_BUDGET = 1 << 24
MAX_SERIAL_SLOTS = 1 << 16
# the digit mask of the one-pass plan: every bit (the digit is the column itself)
ALL_BITS = -1


@cuda.jit(device=True)
def _fine_chunk_rows(f, n_obs, n_segments, per_segment):
    s = f // per_segment
    j = f - s * per_segment
    seg_lo = (s * n_obs) // n_segments
    seg_len = ((s + 1) * n_obs) // n_segments - seg_lo
    return (seg_lo + (j * seg_len) // per_segment,
            seg_lo + ((j + 1) * seg_len) // per_segment)


@cuda.jit
def chunk_digit_count_kernel(keys, n_segments, per_segment, shift, mask, counts):
    """Thread per fine chunk f (segment f // per_segment, split in per_segment equal parts):
    counts[d, f] = the used slots (key >= 0) in its rows whose digit (key >> shift) & mask
    is d."""
    n_rows = keys.shape[0]
    for f in range(cuda.grid(1), counts.shape[1], cuda.gridsize(1)):
        for d in range(counts.shape[0]):
            counts[d, f] = 0
        lo, hi = _fine_chunk_rows(f, n_rows, n_segments, per_segment)
        for row in range(lo, hi):
            for k in range(keys.shape[1]):
                c = keys[row, k]
                if c >= 0:
                    counts[(c >> shift) & mask, f] += 1


@cuda.jit
def column_scan_kernel(counts, totals):
    """Thread per column (digit value): counts[c, :] -> its exclusive prefix sums in place;
    totals[c] = the column's entries."""
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
def chunk_digit_fill_kernel(keys, positions, has_positions, n_segments, per_segment, shift,
                            mask, cursor, positions_out, keys_out, write_keys):
    """Thread per fine chunk: each used slot's position at its digit's next entry (cursor:
    the chunk's first entry per digit value; rows in order, so the sort is stable). The
    position is the flat obs * K + slot of ELL columns keys (n, K), or positions[row] when
    keys (n, 1) are an earlier pass's sorted columns; write_keys: the column goes to
    keys_out (n, 1) too, for the next pass or the segment search."""
    n_rows = keys.shape[0]
    n_slots = keys.shape[1]
    for f in range(cuda.grid(1), cursor.shape[1], cuda.gridsize(1)):
        lo, hi = _fine_chunk_rows(f, n_rows, n_segments, per_segment)
        for row in range(lo, hi):
            for k in range(n_slots):
                c = keys[row, k]
                if c >= 0:
                    d = (c >> shift) & mask
                    j = cursor[d, f]
                    if has_positions:
                        positions_out[j] = positions[row]
                    else:
                        positions_out[j] = row * n_slots + k
                    if write_keys:
                        keys_out[j, 0] = c
                    cursor[d, f] = j + 1


@cuda.jit
def entry_offset_search_kernel(keys, entry_flat, n_entries, n_rows, n_slots, entry_offset):
    """Thread per (column, segment bound): entry_offset[c, s] = the first of the n_entries
    entries (sorted by column, then flat position) whose (column, position) is not below
    (c, bound_s * K), bound_s = s n / S (segment_bounds); s = S: the column's end. A binary
    search: the same offsets as the host's scan."""
    n_params = entry_offset.shape[0]
    n_bounds = entry_offset.shape[1]
    n_segments = n_bounds - 1
    for idx in range(cuda.grid(1), n_params * n_bounds, cuda.gridsize(1)):
        c = idx // n_bounds
        s = idx - c * n_bounds
        limit = ((s * n_rows) // n_segments) * n_slots
        lo = 0
        hi = n_entries
        while lo < hi:
            mid = (lo + hi) // 2
            key = keys[mid, 0]
            if key < c or (key == c and entry_flat[mid] < limit):
                lo = mid + 1
            else:
                hi = mid
        entry_offset[c, s] = lo


def _chunks(rows, n_slots, n_counts, allowed):
    """Chunks to cut rows into: ~ENTRY_CHUNK_ROWS rows each, more if a thread's share (its
    slots, plus its n_counts counts zeroed) would pass MAX_SERIAL_SLOTS, at most allowed;
    None when even that leaves too long a share."""
    room = (MAX_SERIAL_SLOTS - n_counts) // max(n_slots, 1)
    if room < 1:
        return None
    n_chunks = min(max(1, allowed), max(-(-rows // ENTRY_CHUNK_ROWS), -(-rows // room), 1))
    return n_chunks if -(-rows // n_chunks) <= room else None


def segments_plan(n_obs, n_slots, n_params, n_segments):
    """("segments", per_segment): one pass, per_segment fine chunks per gradient segment,
    when the (column x chunk) table fits the count budget with a thread's share within
    MAX_SERIAL_SLOTS; else None."""
    n_obs, n_slots = int(n_obs), int(n_slots)
    n_params, n_segments = max(int(n_params), 1), max(int(n_segments), 1)
    if n_params * n_segments > ENTRY_COUNT_BUDGET:
        return None
    per_segment = _chunks(-(-n_obs // n_segments), n_slots, n_params,
                          ENTRY_COUNT_BUDGET // (n_params * n_segments))
    return None if per_segment is None else ("segments", per_segment)


def radix_plan(n_obs, n_slots, n_params):
    """("radix", bits, passes, n_chunks): the fewest passes whose (digit x chunk) table fits
    the count budget and whose threads' shares fit MAX_SERIAL_SLOTS (later passes' chunks
    hold at most as many entries as the first's rows hold slots); None only past ~2^38
    slots (no device holds such a layout)."""
    n_obs, n_slots, n_params = int(n_obs), int(n_slots), max(int(n_params), 1)
    total_bits = max(1, (n_params - 1).bit_length())
    for passes in range(1, total_bits + 1):
        bits = -(-total_bits // passes)
        if (1 << bits) > ENTRY_COUNT_BUDGET:
            continue
        n_chunks = _chunks(n_obs, n_slots, 1 << bits, ENTRY_COUNT_BUDGET >> bits)
        if n_chunks is not None:
            return ("radix", bits, -(-total_bits // bits), n_chunks)
    return None


def entry_plan(n_obs, n_slots, n_params, n_segments):
    """How column_entries_on_device sorts a layout's used slots: the one-pass segments_plan
    where it fits, else radix_plan (few segments and many columns)."""
    return (segments_plan(n_obs, n_slots, n_params, n_segments)
            or radix_plan(n_obs, n_slots, n_params))


def _count_digits(keys, n_segments, per_segment, shift, mask, counts):
    """counts (digits x chunks) <- each chunk's first entry within its digit's entries
    (exclusive prefix sums along the chunks); returns each digit's first entry (digits + 1,
    the number of entries last), on the device."""
    n_digits, n_chunks = counts.shape
    chunk_digit_count_kernel[blocks(n_chunks), THREADS_PER_BLOCK](
        keys, n_segments, per_segment, shift, mask, counts)
    totals = cuda.device_array(n_digits, np.int64)
    column_scan_kernel[blocks(n_digits), THREADS_PER_BLOCK](counts, totals)
    digit_start = cuda.device_array(n_digits + 1, np.int64)
    exclusive_scan_kernel[1, 1](totals, digit_start)
    return digit_start


def _fill_digits(keys, positions, n_segments, per_segment, shift, mask, counts, digit_start,
                 positions_out, keys_out):
    """The used slots of keys written in digit order (counts from _count_digits become the
    chunks' cursors). positions None: keys are ELL columns (a slot's position is its flat
    index); keys_out None: the sorted columns are not needed."""
    n_digits, n_chunks = counts.shape
    add_column_start_kernel[blocks(n_digits * n_chunks), THREADS_PER_BLOCK](counts,
                                                                           digit_start)
    unused = cuda.device_array((1, 1), np.int32)  # an argument the kernel is told to skip
    chunk_digit_fill_kernel[blocks(n_chunks), THREADS_PER_BLOCK](
        keys, positions if positions is not None else unused[0], positions is not None,
        n_segments, per_segment, shift, mask, counts, positions_out,
        keys_out if keys_out is not None else unused, keys_out is not None)


def _last(device_vector):
    """The last entry of a device vector, on the host (the one value that comes back)."""
    return int(device_vector[device_vector.shape[0] - 1:].copy_to_host()[0])


def column_entries_on_device(cols, n_params, n_segments, plan=None):
    """(entry_flat, entry_offset (n_params, n_segments + 1)) of the gradient pass from
    device ELL columns cols (n, K), segments of equal length (segment_bounds): the host's
    column_entries exactly, made on the device by entry_plan's plan (or the plan given:
    benchmarks/gpu_check.py checks the radix plan on layouts that would not take it); None
    only for a layout past the plans' reach. Device memory besides the entries (8 B per
    used slot): the count table (at most ENTRY_COUNT_BUDGET x 8 B) and, for the radix plan,
    two (column int32, position int64) buffers of the used slots while it runs (one for a
    one-pass sort)."""
    n_params, n_segments = int(n_params), int(n_segments)
    n_obs, n_slots = int(cols.shape[0]), int(cols.shape[1])
    if plan is None:
        plan = entry_plan(n_obs, n_slots, n_params, n_segments)
    if plan is None:
        return None
    entry_offset = cuda.device_array((n_params, n_segments + 1), np.int64)
    if plan[0] == "segments":
        per_segment = plan[1]
        counts = cuda.device_array((n_params, n_segments * per_segment), np.int64)
        column_start = _count_digits(cols, n_segments, per_segment, 0, ALL_BITS, counts)
        # a segment's first entry of a column: that of the segment's first chunk
        entry_offset_kernel[blocks(n_params * (n_segments + 1)), THREADS_PER_BLOCK](
            counts, column_start, per_segment, entry_offset)
        entry_flat = cuda.device_array(max(_last(column_start), 1), np.int64)
        _fill_digits(cols, None, n_segments, per_segment, 0, ALL_BITS, counts, column_start,
                     entry_flat, None)
        return entry_flat, entry_offset
    _, bits, passes, n_chunks = plan
    mask = (1 << bits) - 1
    # one count table for every pass; the chunks are equal parts of the rows (pass 0: the
    # ELL rows, later passes: the previous pass's sorted entries, one slot per row)
    counts = cuda.device_array((mask + 1, n_chunks), np.int64)
    keys, positions, n_entries, buffers = cols, None, 0, None
    for p in range(passes):
        digit_start = _count_digits(keys, 1, n_chunks, p * bits, mask, counts)
        if p == 0:
            n_entries = _last(digit_start)
            if n_entries == 0:
                break
            buffers = [None, None]
        # (column, position) buffers written in turn; a one-pass sort needs one
        if buffers[p % 2] is None:
            buffers[p % 2] = (cuda.device_array((n_entries, 1), np.int32),
                              cuda.device_array(n_entries, np.int64))
        keys_out, positions_out = buffers[p % 2]
        _fill_digits(keys, positions, 1, n_chunks, p * bits, mask, counts, digit_start,
                     positions_out, keys_out)
        keys, positions = keys_out, positions_out
    if buffers is None:  # no used slot: every column's entries are empty
        keys = cuda.device_array((1, 1), np.int32)
        positions = cuda.device_array(1, np.int64)
    entry_offset_search_kernel[blocks(n_params * (n_segments + 1)), THREADS_PER_BLOCK](
        keys, positions, n_entries, n_obs, n_slots, entry_offset)
    return positions, entry_offset
