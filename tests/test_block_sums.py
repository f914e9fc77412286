"""Block sums (backends/block_sums.py): the same bits for any split over ranks and threads.

The ranks of an MPI run are simulated in one process: each simulated rank folds the blocks of
its range, the nodes of all ranks are pooled as the Allgatherv would pool them, and the tree
is finished. The result is compared with a pairwise sum written here independently
(recursive halving of the padded block range) and must be bit-identical for 1..7 ranks.
"""

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge.backends import block_sums
from dials_vmerge.backends.block_sums import (_Fold, canonical_nodes, fixed_block_bounds,
                                              rank_block_ranges, tree_root)


def independent_pairwise(rows):
    """Sum of rows[0..n) as the pairwise tree over a power-of-two padded range."""
    size = 1
    while size < len(rows):
        size *= 2

    def node(lo, width):
        if lo >= len(rows):
            return None
        if width == 1:
            return rows[lo]
        left, right = node(lo, width // 2), node(lo + width // 2, width // 2)
        return left if right is None else left + right

    return node(0, size)


def simulated_ranks(rows, n_ranks, group_start, block_bounds):
    ranges = rank_block_ranges(block_bounds, group_start, n_ranks)
    pooled = {}
    for r in range(n_ranks):
        fold = _Fold()
        for b in range(int(ranges[r]), int(ranges[r + 1])):
            fold.push(b, [rows[b].copy()])
        nodes = fold.nodes()
        # the nodes a rank holds are exactly the ones every rank predicts for its range
        assert list(nodes) == canonical_nodes(int(ranges[r]), int(ranges[r + 1]))
        pooled.update(nodes)
    return tree_root(pooled, len(rows))[0]


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 7, 16, 37])
def test_tree_sum_identical_for_any_number_of_ranks(n_blocks):
    rng = np.random.default_rng(n_blocks)
    # terms spanning many magnitudes: a different grouping changes the last bits
    rows = [rng.normal(size=5) * 10.0 ** rng.integers(-8, 8, size=5) for _ in range(n_blocks)]
    group_start = np.arange(n_blocks + 1) * 10
    block_bounds = np.arange(n_blocks + 1)
    reference = independent_pairwise(rows)
    for n_ranks in range(1, 8):
        total = simulated_ranks(rows, n_ranks, group_start, block_bounds)
        assert np.array_equal(total, reference), n_ranks
    # and the grouping does matter for these terms (the test could fail)
    sequential = rows[0].copy()
    for row in rows[1:]:
        sequential += row
    if n_blocks >= 7:
        assert not np.array_equal(sequential, reference)


def test_blocks_depend_on_the_data_only(monkeypatch):
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, size=30000)
    group_start = np.concatenate([[0], np.cumsum(sizes)])
    bounds = fixed_block_bounds(group_start)
    n_obs = int(group_start[-1])
    assert bounds.size - 1 == min(n_obs // block_sums.MIN_BLOCK_OBSERVATIONS,
                                  block_sums.MAX_BLOCKS)
    assert bounds[0] == 0 and bounds[-1] == sizes.size and np.all(np.diff(bounds) > 0)
    block_obs = np.diff(group_start[bounds])
    assert block_obs.max() - block_obs.min() <= 2 * sizes.max()  # balanced to a group
    # many parameters: fewer, larger blocks (the tree's vector additions stay small)
    n_par = 20000
    wide = fixed_block_bounds(group_start, n_par)
    assert wide.size - 1 == n_obs // (block_sums.OBSERVATIONS_PER_PARAMETER * n_par)
    # ranks own whole, contiguous blocks balanced by observations
    ranges = rank_block_ranges(bounds, group_start, 3)
    rank_obs = np.diff(group_start[bounds[ranges]])
    assert rank_obs.sum() == n_obs and rank_obs.max() - rank_obs.min() <= 2 * block_obs.max()


def test_blockwise_sum_of_a_kernel_independent_of_batch_and_equal_to_tree():
    # a stand-in kernel: per block, the sum of its observations' values in order
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 6, size=20000)
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    values = rng.normal(size=int(group_start[-1])) * 10.0 ** rng.integers(-6, 6, size=sizes.sum())

    def evaluate(chunks):
        out = np.zeros((chunks.size - 1, 2))
        for c in range(chunks.size - 1):
            for i in range(group_start[chunks[c]], group_start[chunks[c + 1]]):
                out[c, 0] += values[i]
                out[c, 1] += values[i] * values[i]
        return [out]

    bounds = fixed_block_bounds(group_start)
    rows = evaluate(bounds)[0]
    reference = independent_pairwise(list(rows))
    for batch in (1, 2, 3, 64):
        (total,) = block_sums.blockwise_sum(group_start, evaluate, batch)
        assert np.array_equal(total, reference)
    assert np.allclose(reference, [values.sum(), (values ** 2).sum()], rtol=1e-12)
