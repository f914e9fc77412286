"""Sums over ASU groups whose bits depend on the data alone: not on nproc, not on MPI ranks.

A floating-point sum depends on how its terms are grouped. The scaling target, its gradient
and its normal matrix are sums over groups of observations (unique reflections), so the
grouping is fixed here once, from the data:

- Blocks: the groups are cut into `n_blocks` contiguous blocks of about equal observation
  count, n_blocks = clip(n_obs // MIN_BLOCK_OBSERVATIONS, 1, MAX_BLOCKS). Each block's
  partial sum is one sequential pass of a kernel (one thread) over its groups in order.
- Tree: the block partials are added as a pairwise tree over the block index (leaf b at
  level 0; node (l, i) = node (l-1, 2i) + node (l-1, 2i+1); leaves past the last block are
  absent and a node with one present child is that child). Its root is the total.
- Ranks: under MPI each rank owns a contiguous range of whole blocks, balanced by
  observation count. It folds its blocks into the maximal tree nodes lying inside its range
  (at most 2 log2(n_blocks) of them, found by `canonical_nodes`), the ranks exchange those
  nodes (one Allgatherv of float64 buffers; every rank can compute every range, so no
  counts travel), and every rank finishes the same tree. Every node's value is defined by
  the tree alone, so N = 1, 2, 3 ... ranks and any nproc give identical bits.

Threads: a kernel is called on a batch of consecutive blocks of a rank (one block per
prange iteration), so nproc threads share a batch; the batch size changes nothing in the
result. `batch_blocks_for` makes a batch as large as BATCH_PARTIAL_BYTES of partials allow
(usually all of a rank's blocks in one call: each call costs a thread launch and a dispatch,
which dominated when the minimisation subset, ~5% of the rows, was summed over the input's
key blocks of ~200 rows each); after each batch the fold copies out the few tree nodes
still viewing the batch's buffers, so at most one batch and ~log2(n_blocks) nodes are held.
"""

from __future__ import annotations

import numpy as np

from . import mpi_world

# A block is one thread's sequential pass: large enough that the tree's additions (a few
# passes over one vector of n_par entries per block) stay small beside the kernel's work on
# the block's observations, small enough that ranks get whole blocks in balance
# (MAX_BLOCKS >= the ranks you will use).
MIN_BLOCK_OBSERVATIONS = 4096
OBSERVATIONS_PER_PARAMETER = 2
MAX_BLOCKS = 512
# The partials of one kernel call (a batch of blocks) stay within this many bytes: a normal
# matrix partial is n_par^2 doubles per block (512 blocks x 300^2 x 8 B would be 368 MB).
BATCH_PARTIAL_BYTES = 16 << 20


def batch_blocks_for(partial_doubles, nproc=1):
    """Blocks per kernel call when each block's partials are `partial_doubles` float64:
    as many as fit in BATCH_PARTIAL_BYTES, and at least one per thread."""
    by_memory = BATCH_PARTIAL_BYTES // (8 * max(int(partial_doubles), 1))
    return int(max(by_memory, int(nproc), 1))


def fixed_block_bounds(group_start, n_par=0):
    """Group offsets (n_blocks + 1) of the blocks: a function of the groups and of the number
    of parameters (the length of the partial vectors) only.

    n_blocks = clip(n_obs // max(MIN_BLOCK_OBSERVATIONS, OBSERVATIONS_PER_PARAMETER n_par),
    1, MAX_BLOCKS)."""
    group_start = np.asarray(group_start, dtype=np.int64)
    n_groups = group_start.size - 1
    n_obs = int(group_start[-1]) if group_start.size else 0
    block_obs = max(MIN_BLOCK_OBSERVATIONS, OBSERVATIONS_PER_PARAMETER * int(n_par))
    n_blocks = int(np.clip(n_obs // block_obs, 1, MAX_BLOCKS))
    n_blocks = max(1, min(n_blocks, max(n_groups, 1)))
    targets = np.linspace(0, n_obs, n_blocks + 1)[1:-1]
    inner = np.searchsorted(group_start, targets, side="left")
    bounds = np.concatenate([[0], inner, [max(n_groups, 0)]]).astype(np.int64)
    return np.maximum.accumulate(bounds)


def shard_bounds(start, n_ranks):
    """Offsets (n_ranks + 1) into the units whose observation offsets are `start` (groups or
    blocks): each boundary is the unit boundary nearest to its equal-observation target, so
    a rank's share is within one unit's size of n_obs / n_ranks."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    start = np.asarray(start, dtype=np.int64)
    n_units = start.size - 1
    n_obs = int(start[-1])
    targets = (np.arange(1, n_ranks, dtype=np.int64) * n_obs) / n_ranks
    above = np.searchsorted(start, targets, side="left")  # first boundary >= target
    below = np.maximum(above - 1, 0)
    distance_above = start[np.minimum(above, n_units)] - targets
    take_below = (targets - start[below]) <= distance_above
    inner = np.where(take_below, below, above)
    bounds = np.concatenate([[0], inner, [n_units]]).astype(np.int64)
    return np.maximum.accumulate(bounds)


def rank_block_ranges(block_bounds, group_start, n_ranks):
    """Block offsets (n_ranks + 1): rank r owns blocks [out[r], out[r+1])."""
    block_obs_start = np.asarray(group_start, dtype=np.int64)[block_bounds]
    return shard_bounds(block_obs_start, n_ranks)


def rank_group_range(group_start, n_par=0, block_bounds=None, rank_blocks=None):
    """(first group, end group) of the blocks this rank evaluates in
    blockwise_sum(group_start, n_par=n_par) (all groups in one process): a rank needs the
    per-observation inputs of these groups' observations only. rank_blocks: as in
    blockwise_sum."""
    if block_bounds is None:
        block_bounds = fixed_block_bounds(group_start, n_par)
    ranges = rank_blocks if rank_blocks is not None else rank_block_ranges(
        block_bounds, group_start, mpi_world.n_ranks())
    rank = mpi_world.rank()
    return int(block_bounds[ranges[rank]]), int(block_bounds[ranges[rank + 1]])


def canonical_nodes(lo, hi):
    """The maximal aligned tree nodes (level, index) covering blocks [lo, hi), in order."""
    nodes = []
    while lo < hi:
        level = 0
        # grow while lo stays aligned to the bigger node and it still fits in [lo, hi)
        while lo % (2 << level) == 0 and lo + (2 << level) <= hi:
            level += 1
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


class _Fold:
    """Block partials pushed in block order, folded into the canonical nodes of the range."""

    def __init__(self):
        self.stack = []  # [level, index, values]

    def push(self, block, values):
        """values: arrays this fold may overwrite (a left node is summed in place)."""
        self._push_node(0, block, values)

    def push_batch(self, first_block, partials):
        """Push blocks first_block, first_block + 1, ... (one leading row of each partial per
        block). The aligned sibling pairs inside the batch are added level by level with
        vectorised element-wise additions (the same additions, hence the same bits, as
        pushing the blocks one by one; no Python work per block); the nodes at the batch's
        edges are pushed in block order."""
        left_edge, right_edge = [], []
        level, start, values = 0, int(first_block), list(partials)
        count = int(values[0].shape[0]) if values else 0
        while count:
            if start % 2:  # its left sibling is outside the batch
                left_edge.append((level, start, [_row(v, 0) for v in values]))
                values = [v[1:] for v in values]
                start += 1
                count -= 1
            if count % 2:  # its right sibling is outside the batch
                right_edge.append((level, start + count - 1, [_row(v, count - 1) for v in values]))
                values = [v[:count - 1] for v in values]
                count -= 1
            if count == 0:
                break
            values = [v[0::2] + v[1::2] for v in values]
            level, start, count = level + 1, start // 2, count // 2
        for node in left_edge + right_edge[::-1]:
            self._push_node(*node)

    def _push_node(self, level, index, values):
        node = [level, index, values]
        while self.stack:
            level, index, left = self.stack[-1]
            if level != node[0] or index % 2 or index + 1 != node[1]:
                break
            self.stack.pop()
            for a, b in zip(left, node[2]):
                a += b
            node = [level + 1, index // 2, left]
        self.stack.append(node)

    def detach(self):
        """Copy the stacked nodes that are views (rows of a batch's partials or of its
        pairwise levels), so that the batch can be freed or its buffer reused: the stack
        then holds at most ~2 log2(n_blocks) nodes of its own."""
        for node in self.stack:
            node[2] = [v if v.flags.owndata else v.copy() for v in node[2]]

    def nodes(self):
        return {(level, index): values for level, index, values in self.stack}


def tree_root(nodes, n_blocks):
    """The root of the pairwise tree over n_blocks leaves from its known nodes
    {(level, index): values}; the known nodes must cover every block exactly once."""
    top = max(int(np.ceil(np.log2(max(n_blocks, 1)))), 0)

    def value(level, index):
        if (index << level) >= n_blocks:
            return None  # entirely past the last block
        known = nodes.get((level, index))
        if known is not None:
            return known
        if level == 0:
            raise ValueError(f"block {index} has no partial sum")
        left = value(level - 1, 2 * index)
        right = value(level - 1, 2 * index + 1)
        if right is None:
            return left
        return [a + b for a, b in zip(left, right)]

    return value(top, 0)


def _row(partial, row):
    """Row `row` of a batch's partial as a writable view (0-d for a per-block scalar); the
    fold adds into it in place, and detaches it from the batch if it outlives the batch."""
    return partial[row:row + 1].reshape(partial.shape[1:])


def blockwise_sum(group_start, evaluate, batch_blocks=1, block_bounds=None, n_par=0,
                  rank_blocks=None):
    """Totals of a per-block kernel over all groups, identical on every rank and for any
    number of ranks or threads.

    evaluate(chunks) runs the kernel over the blocks whose group offsets are `chunks`
    (len(chunks) - 1 blocks) and returns a list of arrays, each with one leading row per
    block. Returns the list of totals (shapes without the leading row). The blocks are
    fixed_block_bounds(group_start, n_par) unless given. rank_blocks: the block offsets
    (n_ranks + 1) of the ranks' ranges when they are fixed elsewhere (the read-time key
    blocks of backends/rank_partition.py); by default balanced by this layout's counts. A
    block may be empty (equal offsets): its partial is an exact zero."""
    if block_bounds is None:
        block_bounds = fixed_block_bounds(group_start, n_par)
    n_blocks = block_bounds.size - 1
    n_ranks = mpi_world.n_ranks()
    ranges = rank_blocks if rank_blocks is not None else rank_block_ranges(
        block_bounds, group_start, n_ranks)
    rank = mpi_world.rank()
    lo, hi = int(ranges[rank]), int(ranges[rank + 1])
    fold = _Fold()
    batch_blocks = max(int(batch_blocks), 1)
    shapes = None
    for b0 in range(lo, hi, batch_blocks):
        b1 = min(b0 + batch_blocks, hi)
        partials = evaluate(block_bounds[b0:b1 + 1])
        shapes = [p.shape[1:] for p in partials]
        fold.push_batch(b0, partials)
        fold.detach()
    if n_ranks == 1:
        return tree_root(fold.nodes(), n_blocks)
    if shapes is None:  # this rank owns no block: learn the shapes from an empty call
        shapes = [p.shape[1:] for p in evaluate(block_bounds[lo:lo + 1])]
    nodes = mpi_world.gather_tree_nodes(fold.nodes(), ranges, shapes, canonical_nodes)
    return tree_root(nodes, n_blocks)


def key_block_sum(group_start, evaluate, partial_doubles, nproc=1, key_blocks=None, n_par=0):
    """blockwise_sum with as many blocks per kernel call as partials of `partial_doubles`
    float64 allow (batch_blocks_for), over key_blocks = (block bounds, rank block offsets)
    when given (the job's read-time key blocks, rank_partition.key_blocks_of_groups), else
    over fixed_block_bounds(group_start, n_par): the one way the scaling targets call it."""
    block_bounds, rank_blocks = key_blocks if key_blocks is not None else (None, None)
    return blockwise_sum(group_start, evaluate, batch_blocks_for(partial_doubles, nproc),
                         block_bounds, n_par, rank_blocks)


def blockwise_sum_of_rank_rows(group_keys, evaluate, partition, batch_blocks=1):
    """Totals of a per-block kernel when each rank holds only its own rows (issue 11's
    per-rank layout, backends/rank_partition.py), identical on every rank and for any N.

    group_keys: the packed non-anomalous key of each of this rank's groups, sorted (the
    rank's layout: whatever rows the stage uses, grouped and sorted by key); evaluate(chunks)
    as in blockwise_sum, with `chunks` offsets into this rank's groups. The blocks are the
    partition's fixed key ranges, not a function of this layout's sizes: each is evaluated by
    the rank that holds its keys, and a block with no group of the layout is an exact zero
    partial. The partials are added as the same tree over the block index, so the bits
    depend on the rows and the partition's blocks only."""
    lo, hi = int(partition.rank_blocks[mpi_world.rank()]), int(partition.rank_blocks[mpi_world.rank() + 1])
    if partition.n_ranks != mpi_world.n_ranks():
        raise ValueError(f"partition for {partition.n_ranks} ranks used by {mpi_world.n_ranks()}")
    local_bounds = partition.block_bounds_of_groups(group_keys)[lo:hi + 1]
    n_groups = int(np.asarray(group_keys).size)
    if local_bounds.size and (local_bounds[0] != 0 or local_bounds[-1] != n_groups):
        raise ValueError("a group key lies outside this rank's blocks")
    fold = _Fold()
    batch_blocks = max(int(batch_blocks), 1)
    shapes = None
    for b0 in range(lo, hi, batch_blocks):
        b1 = min(b0 + batch_blocks, hi)
        partials = evaluate(local_bounds[b0 - lo:b1 - lo + 1])
        shapes = [p.shape[1:] for p in partials]
        fold.push_batch(b0, partials)
        fold.detach()
    if shapes is None:  # this rank owns no block: learn the shapes from an empty call
        shapes = [p.shape[1:] for p in evaluate(np.zeros(2, dtype=np.int64))]
    if mpi_world.n_ranks() == 1:
        return tree_root(fold.nodes(), partition.n_blocks)
    nodes = mpi_world.gather_tree_nodes(fold.nodes(), partition.rank_blocks, shapes, canonical_nodes)
    return tree_root(nodes, partition.n_blocks)
