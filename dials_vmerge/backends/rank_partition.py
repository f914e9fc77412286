"""Which input rows each MPI rank holds: whole unique reflections, decided once at read time.

Issue 11 asks that each rank hold and process only the observations of its own unique
reflections, so that per-rank memory is ~1/N. The partition is made here, from the
`miller_index` column (one pass, in chunks, through the lazy reader; the counts also read
`id`, `partiality` and, of the rows partial summation may merge, `partial_id` and the
intensity variances), before any other column is read:

- Key: every row's NON-anomalous ASU index (Friedel mates together), packed into one int64
  whose order is the lexicographic (h, k, l) order of the scaling and merging groupings
  (scaling/ih_table.py). The packing has a fixed origin (not the data's minimum), so a later
  layout with fewer rows (suitable rows, rows after outliers) gives every group the same key.
  Grouping by the non-anomalous index keeps both groupings a later stage may use (I(+) and
  I(-) apart, or together) whole on one rank.
- Blocks: the sorted distinct keys are cut into fixed blocks of about equal observation count
  with the block sums' own rule (backends/block_sums.py fixed_block_bounds on the group
  offsets: n_obs // 4096 blocks, at most 512). A block is a range of keys, so its bounds are a
  function of the input rows only: the same for any number of ranks. The observations
  counted are the rows preparation keeps (prepared_key_counts): not rows of no dataset
  (id < 0) nor the later pieces of split partials it sums into their first piece. So a
  rerun on scaled.refl, whose rows are those prepared rows, cuts the same blocks as the run
  that wrote it and reproduces its bits (issue 15).
- Ranks: rank r owns a contiguous range of whole blocks balanced by observation count
  (block_sums.shard_bounds, within one block of n_obs / N), i.e. a half-open range of keys.
  Because every rank boundary is a block boundary for any N, sums taken block by block and
  added as the block sums' tree over the block index give the same bits for N = 1, 2, 3 ...

Every rank computes the same partition from the same columns (no communication): it reads
`miller_index` twice in slices of PARTITION_CHUNK_ROWS (counting rows per key, then picking
its rows; no per-row array of the whole input is held, only its own row numbers, one
count per unique reflection and 32 B per row partial summation may merge) and then selects its own rows from the table, which leaves the other columns in the file (LazyColumn row
subsets) until a stage reads them: a rank then holds only its own rows of each column. (It
still reads the file in windows of lazy_column.CHUNK_ROWS rows and picks its rows out: a
rank's rows are spread over the whole file, since every image measures every resolution
range, so the I/O is not 1/N, but the buffers are bounded.)

`RankRows.input_rows` keeps each held row's row number in the input table, so that the
output stage can put scaled.refl's rows back in input order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import VmergeError
from . import block_sums

# Bits per Miller index component in a packed key (3 x 21 = 63 bits: the key stays positive).
KEY_COMPONENT_BITS = 21
KEY_COMPONENT_OFFSET = 1 << (KEY_COMPONENT_BITS - 1)
# Rows of `miller_index` read and mapped per step (bounds the transient buffers).
PARTITION_CHUNK_ROWS = 1 << 18


def packed_keys(asu_index) -> np.ndarray:
    """One int64 per (h, k, l), ordered as (h, k, l) lexicographically, with a fixed origin:
    ((h + 2^20) << 42) | ((k + 2^20) << 21) | (l + 2^20)."""
    hkl = np.asarray(asu_index, dtype=np.int64).reshape(-1, 3)
    if hkl.size and (hkl.min() < -KEY_COMPONENT_OFFSET or hkl.max() >= KEY_COMPONENT_OFFSET):
        raise VmergeError(
            f"Miller index component outside +-{KEY_COMPONENT_OFFSET} (largest "
            f"{int(np.abs(hkl).max())}): the reflection file holds no real Miller indices")
    shifted = hkl + KEY_COMPONENT_OFFSET
    return ((shifted[:, 0] << (2 * KEY_COMPONENT_BITS))
            | (shifted[:, 1] << KEY_COMPONENT_BITS) | shifted[:, 2])


def unpack_keys(keys) -> np.ndarray:
    """The (n, 3) int64 indices of packed_keys."""
    keys = np.asarray(keys, dtype=np.int64)
    mask = (1 << KEY_COMPONENT_BITS) - 1
    out = np.empty((keys.size, 3), dtype=np.int64)
    out[:, 0] = (keys >> (2 * KEY_COMPONENT_BITS)) & mask
    out[:, 1] = (keys >> KEY_COMPONENT_BITS) & mask
    out[:, 2] = keys & mask
    return out - KEY_COMPONENT_OFFSET


def _key_chunks(table, space_group, chunk_rows: int = PARTITION_CHUNK_ROWS):
    """(start, packed non-anomalous keys of rows start..) for consecutive slices of the
    table: neither the whole miller_index column nor a whole ASU copy is ever held."""
    from ..asu_mapping import asu_indices

    for start in range(0, table.nrows, chunk_rows):
        stop = min(start + chunk_rows, table.nrows)
        hkl = np.asarray(table.peek("miller_index", np.arange(start, stop))).reshape(-1, 3)
        # one cctbx mapping per distinct reflection of the slice (asu_mapping: the same
        # indices as cctbx's per-row mapping)
        yield start, packed_keys(asu_indices(hkl, space_group, anomalous=False))


def non_anomalous_keys(table, space_group, chunk_rows: int = PARTITION_CHUNK_ROWS) -> np.ndarray:
    """The packed non-anomalous ASU key of every row of `table` (a ReflectionTable)."""
    keys = np.empty(table.nrows, dtype=np.int64)
    for start, chunk in _key_chunks(table, space_group, chunk_rows):
        keys[start:start + chunk.size] = chunk
    return keys


@dataclass(frozen=True)
class RowPartition:
    """Fixed key blocks and the ranks' ranges of them.

    block_keys: n_blocks + 1 keys; block b holds the rows with keys in
    [block_keys[b], block_keys[b + 1]) (the last bound is one past the largest key).
    block_observations: rows per block. rank_blocks: n_ranks + 1 block offsets; rank r owns
    blocks [rank_blocks[r], rank_blocks[r + 1])."""

    block_keys: np.ndarray
    block_observations: np.ndarray
    rank_blocks: np.ndarray

    @property
    def n_blocks(self) -> int:
        return int(self.block_observations.size)

    @property
    def n_ranks(self) -> int:
        return int(self.rank_blocks.size - 1)

    def rank_key_range(self, rank: int):
        """[lo, hi) of the keys rank `rank` owns (lo == hi: it owns nothing)."""
        return (int(self.block_keys[self.rank_blocks[rank]]),
                int(self.block_keys[self.rank_blocks[rank + 1]]))

    def rank_of_keys(self, keys) -> np.ndarray:
        """The rank owning each key (keys outside every block: -1)."""
        keys = np.asarray(keys, dtype=np.int64)
        block = np.searchsorted(self.block_keys, keys, side="right") - 1
        inside = (block >= 0) & (block < self.n_blocks)
        owner = np.searchsorted(self.rank_blocks, np.where(inside, block, 0), side="right") - 1
        return np.where(inside, owner, -1).astype(np.int64)

    def rows_of_rank(self, keys, rank: int) -> np.ndarray:
        """Row numbers (input order) of the rows with keys in rank `rank`'s range."""
        lo, hi = self.rank_key_range(rank)
        keys = np.asarray(keys, dtype=np.int64)
        return np.flatnonzero((keys >= lo) & (keys < hi))

    def block_bounds_of_groups(self, group_keys) -> np.ndarray:
        """Group offsets (n_blocks + 1) of the fixed blocks in a later layout whose groups are
        sorted by key (group_keys: one packed non-anomalous key per group): the blocks of that
        layout with the same key ranges, hence boundaries that never cross a rank boundary
        (a block may hold no group of the layout)."""
        return np.searchsorted(np.asarray(group_keys, dtype=np.int64), self.block_keys,
                               side="left").astype(np.int64)


def partition_keys(keys, n_ranks: int) -> RowPartition:
    """The partition of rows with these keys over n_ranks ranks (blocks: data only)."""
    distinct, counts = np.unique(np.asarray(keys, dtype=np.int64), return_counts=True)
    return partition_of_counts(distinct, counts, n_ranks)


def partition_of_counts(distinct, counts, n_ranks: int) -> RowPartition:
    """The partition from the sorted distinct keys and their row counts."""
    distinct = np.asarray(distinct, dtype=np.int64)
    if distinct.size == 0:
        return RowPartition(np.zeros(2, np.int64), np.zeros(1, np.int64),
                            np.zeros(n_ranks + 1, np.int64))
    group_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bounds = block_sums.fixed_block_bounds(group_start)
    block_keys = np.append(distinct[bounds[:-1]], distinct[-1] + 1).astype(np.int64)
    block_observations = np.diff(group_start[bounds]).astype(np.int64)
    rank_blocks = block_sums.shard_bounds(group_start[bounds], n_ranks)
    return RowPartition(block_keys, block_observations, rank_blocks)


def _rows_preparation_drops(table, start, keys):
    """Of rows start.. of `table` (keys: their packed keys), what preparation will not keep
    as rows of their own: (keys of rows of no dataset (id < 0), (id, partial_id, row, key) of
    the rows partial summation may merge). The candidates are those of
    scaling/prepare.py sum_partial_reflections: partiality < FULL_PARTIALITY and a positive
    variance of every intensity present (sum, prf, scale); only their few columns' values
    are read, slice by slice."""
    from ..scaling.prepare import FULL_PARTIALITY

    rows = np.arange(start, start + keys.size, dtype=np.int64)
    ids = (np.asarray(table.peek("id", rows), dtype=np.int64) if "id" in table
           else np.zeros(rows.size, np.int64))
    dropped = keys[ids < 0]
    if not ("partiality" in table and "partial_id" in table):
        return dropped, None
    candidate = (ids >= 0) & (np.asarray(table.peek("partiality", rows)) < FULL_PARTIALITY)
    for kind in ("sum", "prf", "scale"):
        if f"intensity.{kind}.value" in table:
            at = np.flatnonzero(candidate)
            candidate[at] = np.asarray(table.peek(f"intensity.{kind}.variance", rows[at])) > 0
    at = np.flatnonzero(candidate)
    partial_id = np.asarray(table.peek("partial_id", rows[at]), dtype=np.int64)
    return dropped, (ids[at], partial_id, rows[at], keys[at])


def _packed_candidates(candidates):
    """The partial-summation candidates of a slice, (ids, partial_id, rows, keys) as
    _rows_preparation_drops gives them, kept as (ids << 32 | partial_id, keys) when every id
    is below 2^31 and every partial_id in [0, 2^32): 16 B per candidate instead of 32 B (for
    stills every row is one). The rows are not needed: the slices come in ascending row
    order and their candidates in row order, so the position in their concatenation orders
    the pieces of a partial as the rows do. Else the 4-tuple unchanged."""
    if candidates is None:
        return None
    ids, partial_id, _, keys = candidates
    if ids.size and (ids.max() >= (1 << 31) or partial_id.min() < 0
                     or partial_id.max() >= (1 << 32)):
        return candidates
    return (ids << 32) | partial_id, keys


def _later_piece_keys(unkept):
    """The keys of the candidates that are not the first piece (in row order) of their
    (id, partial_id): those summation merges into the first. Consumes the candidates of
    `unkept` (each slice's entry becomes (dropped, None)) so that the slices' arrays are
    freed while their concatenation is built."""
    sizes = [c[-1].size for _, c in unkept if c is not None]
    total = int(sum(sizes))
    packed = all(len(c) == 2 for _, c in unkept if c is not None)
    sort_key = np.empty(total, np.int64) if packed else None
    ids = partial_id = None
    if not packed:
        ids, partial_id = np.empty(total, np.int64), np.empty(total, np.int64)
    keys = np.empty(total, np.int64)
    at = 0
    for i, (dropped, c) in enumerate(unkept):
        if c is None:
            continue
        unkept[i] = (dropped, None)
        n = c[-1].size
        keys[at:at + n] = c[-1]
        if packed:
            sort_key[at:at + n] = c[0]
        elif len(c) == 2:
            ids[at:at + n], partial_id[at:at + n] = c[0] >> 32, c[0] & 0xFFFFFFFF
        else:
            ids[at:at + n], partial_id[at:at + n] = c[0], c[1]
        at += n
        del c
    # a stable sort by (id, partial_id): pieces of one partial in row order (concatenation
    # order is row order)
    if packed:
        order = np.argsort(sort_key, kind="stable")
        sort_key = sort_key[order]
        later = np.zeros(total, dtype=bool)
        np.equal(sort_key[1:], sort_key[:-1], out=later[1:])
    else:
        order = np.lexsort((partial_id, ids))
        ids, partial_id = ids[order], partial_id[order]
        later = np.r_[False, (ids[1:] == ids[:-1]) & (partial_id[1:] == partial_id[:-1])]
    return keys[order[later]]


def prepared_key_counts(distinct, counts, unkept):
    """(sorted distinct keys, rows per key) of the rows preparation keeps, from those of all
    rows (distinct, counts) and the slices' _rows_preparation_drops (in ascending row order;
    their candidates may be packed by _packed_candidates; consumed): rows of no dataset are
    taken off, and of the candidates sharing (id, partial_id) (one split partial; summed per
    dataset, files number partial_id from 0 each) all but the first in row order, which
    summation keeps, each at its own key."""
    distinct = np.asarray(distinct, dtype=np.int64)
    counts = np.array(counts, dtype=np.int64)
    dropped = [d for d, _ in unkept]
    if any(c is not None and c[-1].size for _, c in unkept):
        dropped.append(_later_piece_keys(unkept))
    dropped = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
    if dropped.size == 0:
        return distinct, counts
    gone, n_gone = np.unique(dropped, return_counts=True)
    counts[np.searchsorted(distinct, gone)] -= n_gone
    kept = counts > 0
    return distinct[kept], counts[kept]


def partition_table(table, space_group, n_ranks: int,
                    chunk_rows: int = PARTITION_CHUNK_ROWS) -> RowPartition:
    """The partition of a read table. The rows' keys are counted slice by slice (the running
    counts are per unique reflection), so no per-row array of the whole table is held."""
    distinct = np.zeros(0, np.int64)
    counts = np.zeros(0, np.int64)
    unkept = []
    for start, keys in _key_chunks(table, space_group, chunk_rows):
        chunk_distinct, chunk_counts = np.unique(keys, return_counts=True)
        # merge two sorted key lists without sorting their union again (that took ~7 s at
        # 1e7 rows; this ~1 s)
        at = np.searchsorted(distinct, chunk_distinct)
        known = at < distinct.size
        known[known] = distinct[at[known]] == chunk_distinct[known]
        counts[at[known]] += chunk_counts[known]
        distinct = np.insert(distinct, at[~known], chunk_distinct[~known])
        counts = np.insert(counts, at[~known], chunk_counts[~known])
        unkept.append(_rows_preparation_drops(table, start, keys))
    return partition_of_counts(*prepared_key_counts(distinct, counts, unkept), n_ranks)


def _distinct_key_counts(keys, chunk_rows: int = 1 << 20):
    """(sorted distinct keys, rows per key), as np.unique(keys, return_counts=True): by a
    count over the keys' dense (h, k, l) box when it is small beside the rows (always for
    diffraction data: ~3x faster than the sort), else by np.unique. The components and the
    box index are computed slice by slice: one int64 per row beside the keys, not the five
    whole-length temporaries of a vectorised expression (issue 11: this pass runs on every
    MPI rank over all input rows, so its transients bounded each rank's peak)."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    mask = (1 << KEY_COMPONENT_BITS) - 1

    def components(chunk):
        return (chunk >> (2 * KEY_COMPONENT_BITS), (chunk >> KEY_COMPONENT_BITS) & mask,
                chunk & mask)

    lo, hi = [None] * 3, [None] * 3
    for start in range(0, keys.size, chunk_rows):
        for i, c in enumerate(components(keys[start:start + chunk_rows])):
            lo[i] = int(c.min()) if lo[i] is None else min(lo[i], int(c.min()))
            hi[i] = int(c.max()) if hi[i] is None else max(hi[i], int(c.max()))
    span = [h - m + 1 for h, m in zip(hi, lo)]
    if span[0] * span[1] * span[2] > 4 * keys.size + (1 << 20):
        return np.unique(keys, return_counts=True)
    dense = np.empty(keys.size, np.int64)
    for start in range(0, keys.size, chunk_rows):
        h, k, l = components(keys[start:start + chunk_rows])
        dense[start:start + h.size] = ((h - lo[0]) * span[1] + (k - lo[1])) * span[2] + (l - lo[2])
    counts = np.bincount(dense, minlength=span[0] * span[1] * span[2])
    del dense
    present = np.flatnonzero(counts)
    dh, rest = np.divmod(present, span[1] * span[2])
    dk, dl = np.divmod(rest, span[2])
    distinct = (((dh + lo[0]) << (2 * KEY_COMPONENT_BITS)) | ((dk + lo[1]) << KEY_COMPONENT_BITS)
                | (dl + lo[2]))
    return distinct.astype(np.int64), counts[present].astype(np.int64)


@dataclass
class InputRowKeys:
    """The packed non-anomalous key of every row of an input's `miller_index` blob, by file
    row (-1: a file row the partitioned table did not hold). Preparation's grouping of the
    same rows (scaling/algorithm.py) takes its non-anomalous ASU index from these instead of
    mapping every row again (issue 11: the read-time partition then costs no extra mapping)."""

    column: object  # the LazyColumn the keys were read from (its blob identifies the file)
    keys_by_file_row: "np.ndarray | None"  # None once released

    def release(self):
        """Give the 8 B per row back (the grouping has taken what it needs)."""
        self.keys_by_file_row = None

    def asu_of(self, table, rows):
        """The non-anomalous ASU indices (int32 (n, 3), as ih_table.map_indices_to_asu) of
        rows `rows` of `table`, or None if its miller_index is not this blob's rows (or the
        keys were released)."""
        if self.keys_by_file_row is None:
            return None
        located = table.file_rows_of("miller_index", rows) if hasattr(table, "file_rows_of") \
            else None
        if located is None or not located[0]._same_blob(self.column):
            return None
        keys = self.keys_by_file_row[located[1]]
        if keys.size and keys.min() < 0:
            return None
        return unpack_keys(keys).astype(np.int32)


def keys_and_partition(table, space_group, n_ranks: int,
                       chunk_rows: int = PARTITION_CHUNK_ROWS):
    """(every row's packed key, the partition cut from the counts of the rows preparation
    keeps): the one partition of a job, whether every rank holds every row (keyed_partition)
    or each rank only its own (pipeline.rank_local_rows), so that both sum over the same
    blocks."""
    keys = non_anomalous_keys(table, space_group, chunk_rows)
    # the counts of all rows first, then the slices' candidates (packed: for stills every row
    # is one), so that the two passes' transients never coexist
    distinct, counts = _distinct_key_counts(keys)
    unkept = []
    for start in range(0, table.nrows, chunk_rows):
        dropped, candidates = _rows_preparation_drops(table, start,
                                                      keys[start:start + chunk_rows])
        unkept.append((dropped, _packed_candidates(candidates)))
    return keys, partition_of_counts(*prepared_key_counts(distinct, counts, unkept), n_ranks)


def keyed_partition(table, space_group, n_ranks: int, chunk_rows: int = PARTITION_CHUNK_ROWS):
    """(partition_table's partition, InputRowKeys or None) of a table whose rows every rank
    holds (today's programs): one pass maps every row, holding 8 B of key per row, so that
    preparation can reuse the mapping. None: miller_index is not in a file (no row
    provenance to look the keys up by)."""
    keys, partition = keys_and_partition(table, space_group, n_ranks, chunk_rows)
    located = table.file_rows_of("miller_index", np.arange(table.nrows)) \
        if hasattr(table, "file_rows_of") else None
    if located is None:
        return partition, None
    column, file_rows = located
    if column.rows is None:
        by_file_row = keys
    else:
        by_file_row = np.full(column.file_rows, -1, dtype=np.int64)
        by_file_row[file_rows] = keys
    return partition, InputRowKeys(column, by_file_row)


@dataclass
class RankRows:
    """The rows one rank holds: its table (other columns still lazy where the input was) and
    each row's row number in the input table."""

    table: object
    input_rows: np.ndarray
    partition: RowPartition
    rank: int


def rank_rows(table, space_group, n_ranks: int, rank: int,
              chunk_rows: int = PARTITION_CHUNK_ROWS) -> RankRows:
    """Rank `rank`'s rows of `table` (whole non-anomalous ASU groups). Two passes over
    miller_index in slices (count, then select: the ASU mapping runs twice, ~0.23 s per 1e6
    rows each, instead of holding 8 bytes of key per input row). The selection keeps lazy
    columns lazy, so the rank later materialises only its own rows of each column."""
    if not 0 <= rank < n_ranks:
        raise ValueError(f"rank {rank} outside 0..{n_ranks - 1}")
    partition = partition_table(table, space_group, n_ranks, chunk_rows)
    lo, hi = partition.rank_key_range(rank)
    pieces = [start + np.flatnonzero((keys >= lo) & (keys < hi))
              for start, keys in _key_chunks(table, space_group, chunk_rows)]
    rows = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
    return RankRows(table.select(rows), rows, partition, rank)


def positions_within_dataset(table, input_rows, chunk_rows: int = PARTITION_CHUNK_ROWS):
    """For each row of `input_rows` (ascending rows of the whole input `table`): its position
    among the input rows of its dataset (`id`), counted in input order. This is preparation's
    `original_index` (scaling/prepare.py rank_within_dataset numbers each dataset's rows in
    input order) for a rank that holds only its own rows. A prefix count over ranks cannot
    give it, because the ranks' rows interleave in input order; so each rank reads the `id`
    column of every row in slices (4 B per row read, only running counts per dataset kept)."""
    input_rows = np.asarray(input_rows, dtype=np.int64)
    if input_rows.size and np.any(np.diff(input_rows) <= 0):
        raise ValueError("input_rows must be ascending")
    out = np.empty(input_rows.size, dtype=np.int64)
    seen = {}  # id -> rows of that id before the current slice
    for start in range(0, table.nrows, chunk_rows):
        stop = min(start + chunk_rows, table.nrows)
        ids = np.asarray(table.peek("id", np.arange(start, stop)), dtype=np.int64)
        distinct, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        within = np.empty(ids.size, dtype=np.int64)
        within[order] = np.arange(ids.size) - np.repeat(first, counts)
        before = np.array([seen.get(int(d), 0) for d in distinct], dtype=np.int64)
        lo, hi = np.searchsorted(input_rows, [start, stop])
        local = input_rows[lo:hi] - start
        out[lo:hi] = before[inverse[local]] + within[local]
        for d, c in zip(distinct.tolist(), counts.tolist()):
            seen[d] = seen.get(d, 0) + c
    return out


# -- the partition of the running job: the blocks of every block sum --------------------------
# Issue 11: N = 1, 2, 3 ranks give the same bits only if every run, one process included,
# sums over the same blocks. The programs cut the key blocks once from the input rows
# (pipeline.run_scaling_job) and every block sum of that job then uses them, whatever
# layout (suitable rows, after outliers) it sums over.
_active = []
_active_keys = []


@contextmanager
def job_partition(partition: RowPartition, row_keys: "InputRowKeys | None" = None):
    """The partition whose key blocks the block sums of the enclosed job use; row_keys: the
    input rows' keys it was cut from (keyed_partition), for preparation to reuse."""
    _active.append(partition)
    _active_keys.append(row_keys)
    try:
        yield partition
    finally:
        _active.pop()
        _active_keys.pop()


def active_partition():
    """The partition of the running job (None outside pipeline.run_scaling_job)."""
    return _active[-1] if _active else None


def partition_asu_of_rows(table, rows, release=True):
    """The non-anomalous ASU indices of rows `rows` of `table` from the running job's
    partition pass (int32 (n, 3)), or None (no job keys, or rows not from the keyed file):
    the caller then maps them itself. release: the job's keys are given back after this
    look-up (its one user, scaling's grouping, asks once per job), so they do not add
    8 B per input row to the job's peak."""
    row_keys = _active_keys[-1] if _active_keys else None
    if row_keys is None:
        return None
    asu = row_keys.asu_of(table, rows)
    if release:
        row_keys.release()
    return asu


def release_partition_keys():
    """Give the running job's input-row keys back unused: a run grouped by the anomalous
    index looks no non-anomalous ASU index up from them (partition_asu_of_rows), and would
    otherwise hold them (8 B per row) to the end of the job."""
    row_keys = _active_keys[-1] if _active_keys else None
    if row_keys is not None:
        row_keys.release()


def key_blocks_of_groups(group_asu):
    """(group offsets of the key blocks (n_blocks + 1), rank block offsets (n_ranks + 1)) of a
    layout whose groups have the ASU indices `group_asu`, sorted in (h, k, l) order; None
    when no job partition is active. Groups by the anomalous index pass their non-anomalous
    indices (ih_table.IhTable.block_key_asu): I(+) and I(-) of one key are consecutive
    groups with the same index, kept in one block.

    Groups keyed below the first block or above the last (a later layout may hold indices
    the input rows did not: anomalous groups of Friedel mates) join the first or last block,
    so every group is summed exactly once and the blocks still depend on the data only."""
    partition = active_partition()
    if partition is None:
        return None
    from . import mpi_world

    if partition.n_ranks != mpi_world.n_ranks():
        raise ValueError(f"partition for {partition.n_ranks} ranks used by "
                         f"{mpi_world.n_ranks()}")
    keys = packed_keys(group_asu)
    if keys.size > 1 and np.any(keys[1:] < keys[:-1]):
        raise ValueError("the layout's groups are not sorted by ASU index")
    bounds = partition.block_bounds_of_groups(keys)
    bounds[0] = 0
    bounds[-1] = keys.size
    return np.maximum.accumulate(bounds), partition.rank_blocks
