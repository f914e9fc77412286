"""Issue 11: the block sums evaluate a batch of blocks (up to all of a rank's) in one kernel
call, with the same bits as one kernel call per block.

The references here call each kernel on ONE block at a time (a loop written in this file)
and add the per-block partials with an independent pairwise sum (test_block_sums.py's
`independent_pairwise`), over key blocks of a read-time partition that include empty blocks
and many blocks of a few groups each (the minimisation subset's case that made per-block
calls slow). Equality is bitwise.
"""

import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba)
from dials_vmerge.backends import block_sums
from dials_vmerge.backends.block_sums import _Fold, batch_blocks_for, tree_root
from dials_vmerge.backends.rank_partition import (job_partition, key_blocks_of_groups,
                                                  partition_keys)

from test_block_sums import independent_pairwise
from test_rank_blocks_in_runs import keys_by_numpy


def partition_keys_with_blocks_of(keys, block_observations):
    """The one-rank partition of these keys with blocks of ~block_observations rows (the
    rule's constant set for this call only: many blocks from a small test input)."""
    saved = block_sums.MIN_BLOCK_OBSERVATIONS
    block_sums.MIN_BLOCK_OBSERVATIONS = block_observations
    try:
        return partition_keys(keys, 1)
    finally:
        block_sums.MIN_BLOCK_OBSERVATIONS = saved


def key_blocked_layout(seed, n_par, n_input_groups=6000, keep=0.08, slots=3):
    """A minimisation-subset-like layout: a small fraction of the input's groups, summed over
    the input's key blocks (blocks of a handful of groups, some empty)."""
    rng = np.random.default_rng(seed)
    input_hkl = np.unique(rng.integers(-40, 40, (n_input_groups, 3)), axis=0)
    input_keys = np.repeat(keys_by_numpy(input_hkl), rng.integers(1, 12, len(input_hkl)))
    partition = partition_keys_with_blocks_of(input_keys, 300)
    layout_hkl = input_hkl[rng.random(len(input_hkl)) < keep]
    multiplicity = rng.integers(1, 6, len(layout_hkl))
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n_obs = int(group_start[-1])
    with job_partition(partition):
        key_blocks = key_blocks_of_groups(layout_hkl)
    # values spanning magnitudes: a different grouping of the sums changes the last bits
    arrays = dict(
        intensity=rng.gamma(2.0, 50.0, n_obs) * 10.0 ** rng.integers(-3, 3, n_obs),
        weight=1.0 / rng.uniform(1.0, 20.0, n_obs),
        g=rng.uniform(0.5, 1.5, n_obs),
        deriv_values=rng.normal(size=(n_obs, slots)),
        deriv_col=rng.integers(-1, n_par, (n_obs, slots)).astype(np.int32),
    )
    return arrays, group_start, key_blocks


def per_block_reference(kernel, arrays, group_start, bounds, shapes):
    """The kernel's serial build called once per block; partials added pairwise."""
    rows = []
    for b in range(bounds.size - 1):
        partials = [np.zeros((1,) + shape) for shape in shapes]
        kernel.serial(arrays["intensity"], arrays["weight"], arrays["g"],
                      arrays["deriv_values"], arrays["deriv_col"], group_start,
                      np.array(bounds[b:b + 2], dtype=np.int64), *partials)
        rows.append([p[0] for p in partials])
    return [independent_pairwise([r[i] for r in rows]) for i in range(len(shapes))]


@pytest.mark.parametrize("nproc", [1, 2])
def test_batched_normal_equations_equal_per_block_calls(nproc):
    from dials_vmerge.scaling.target import normal_equations, normal_matrix_kernel

    n_par = 17
    arrays, group_start, key_blocks = key_blocked_layout(3, n_par)
    bounds = key_blocks[0]
    assert bounds.size - 1 >= 40 and np.any(np.diff(bounds) == 0)
    # all blocks fit in one call: the batched path is what is tested
    assert batch_blocks_for(1 + n_par + n_par * n_par, nproc) >= bounds.size - 1
    expected = per_block_reference(normal_matrix_kernel, arrays, group_start, bounds,
                                   [(), (n_par,), (n_par, n_par)])
    phi, rhs, normal = normal_equations(arrays["intensity"], arrays["weight"], arrays["g"],
                                        arrays["deriv_values"], arrays["deriv_col"],
                                        group_start, n_par, nproc, key_blocks=key_blocks)
    assert phi == expected[0]
    assert np.array_equal(rhs, expected[1]) and np.array_equal(normal, expected[2])
    # the pairing matters for these values (the comparison could fail): block order summed
    # sequentially differs
    sequential = per_block_reference(normal_matrix_kernel, arrays, group_start,
                                     np.array([0, group_start.size - 1]),
                                     [(), (n_par,), (n_par, n_par)])
    assert not np.array_equal(sequential[2], expected[2])


@pytest.mark.parametrize("nproc", [1, 2])
def test_batched_target_gradient_equal_per_block_calls(nproc):
    from dials_vmerge.scaling.target import target_and_gradient, target_gradient_kernel

    n_par = 9
    arrays, group_start, key_blocks = key_blocked_layout(4, n_par)
    bounds = key_blocks[0]
    expected = per_block_reference(target_gradient_kernel, arrays, group_start, bounds,
                                   [(), (n_par,)])
    phi, grad = target_and_gradient(arrays["intensity"], arrays["weight"], arrays["g"],
                                    arrays["deriv_values"], arrays["deriv_col"],
                                    group_start, n_par, nproc, key_blocks=key_blocks)
    assert phi == expected[0] and np.array_equal(grad, expected[1])


def test_batch_buffer_bounded_and_the_fold_survives_buffer_reuse():
    # the normal matrix of a 300-parameter sweep: 512 blocks would be 368 MB of partials
    n_par = 300
    batch = batch_blocks_for(1 + n_par + n_par * n_par, 2)
    assert 2 <= batch and batch * (1 + n_par + n_par ** 2) * 8 <= block_sums.BATCH_PARTIAL_BYTES
    # a kernel whose every call overwrites the same buffer: the fold's nodes left on its
    # stack after a batch must not view that buffer any more (detach), or later batches
    # would corrupt them
    rng = np.random.default_rng(11)
    n_blocks = 37
    rows = rng.normal(size=(n_blocks, 4)) * 10.0 ** rng.integers(-8, 8, (n_blocks, 4))
    group_start = np.arange(n_blocks + 1, dtype=np.int64)
    bounds = np.arange(n_blocks + 1, dtype=np.int64)
    buffer = np.empty((5, 4))

    def evaluate(chunks):
        n = chunks.size - 1
        buffer[:] = np.nan
        buffer[:n] = rows[chunks[0]:chunks[0] + n]
        return [buffer[:n]]

    reference = independent_pairwise(list(rows))
    for batch_blocks in (1, 2, 3, 5):
        (total,) = block_sums.blockwise_sum(group_start, evaluate, batch_blocks, bounds)
        assert np.array_equal(total, reference), batch_blocks
    # without the detach step the same run is wrong (the test can fail)
    fold = _Fold()
    for b0 in range(0, n_blocks, 5):
        part = evaluate(bounds[b0:min(b0 + 5, n_blocks) + 1])
        for row in range(part[0].shape[0]):
            fold.push(b0 + row, [part[0][row]])
    assert not np.array_equal(tree_root(fold.nodes(), n_blocks)[0], reference)


@pytest.fixture(scope="module")
def quartz_table():
    from conftest import DATA
    from dials_vmerge import flags
    from dials_vmerge.io import read_experiments, read_reflections

    folder = os.path.join(DATA, "quartz_processed")
    t = read_reflections(os.path.join(folder, "integrated.refl"))
    e = read_experiments(os.path.join(folder, "integrated.expt"))[0]
    good = ((t["flags"] & flags.integrated_sum) != 0) & (t["d"] > 0) & (
        t["intensity.sum.variance"] > 0)
    return t.select(good), e


def test_fused_physical_pass_over_key_blocks_equals_per_block_calls(quartz_table):
    from dials_vmerge import geometry
    from dials_vmerge.model.factory import create_scaling_model, default_model_params
    from dials_vmerge.scaling.ih_table import build_ih_table, map_indices_to_asu
    from dials_vmerge.scaling.parameters import ParameterManager
    from dials_vmerge.scaling.physical_pass import physical_target_gradient_partials
    from dials_vmerge.scaling.target import ScalingTarget

    table, expt = quartz_table
    model = create_scaling_model(default_model_params(), expt, table)
    model.configure(table, expt)
    rng = np.random.default_rng(5)
    model.set_parameter_vector(model.parameter_vector()
                               + rng.normal(0, 0.05, model.parameter_vector().size))
    sg = geometry.space_group(expt)
    asu = map_indices_to_asu(table["miller_index"], sg, False)
    variance = table["intensity.sum.variance"]
    ih = build_ih_table([asu], [table["intensity.sum.value"]], [variance], [1.0 / variance],
                        [np.ones(variance.size)])
    # key blocks of a few groups each: the partition of the input cut into ~40-row blocks
    keys = keys_by_numpy(asu)
    partition = partition_keys_with_blocks_of(keys, 40)
    manager = ParameterManager([model])
    with job_partition(partition):
        target = ScalingTarget(manager, ih, 2)
        assert target.fused is not None and target.key_blocks is not None
        bounds = target.key_blocks[0]
        assert bounds.size - 1 >= 30
        x = manager.get_free()
        phi, grad = target.value_and_gradient(x)

    parameters = target.full_base.copy()
    parameters[target.free_entries] = x[target.full_to_free[target.free_entries]]
    rows = [physical_target_gradient_partials(target.fused, ih.group_start,
                                              np.array(bounds[b:b + 2]), target.max_group_size,
                                              parameters)
            for b in range(bounds.size - 1)]
    expected_phi = independent_pairwise([r[0][0] for r in rows])
    expected_full = independent_pairwise([r[1][0] for r in rows])[:target.fused.n_full]
    expected_grad = np.zeros(x.size)
    np.add.at(expected_grad, target.full_to_free[target.free_entries],
              expected_full[target.free_entries])
    wr = target.restraint_weights
    assert phi == float(expected_phi) + float(np.sum(wr * x * x))
    assert np.array_equal(grad, expected_grad + 2.0 * wr * x)


@pytest.mark.parametrize("seed", range(6))
def test_push_batch_gives_the_nodes_of_block_by_block_pushes(seed):
    # any range of a rank, cut into batches of any sizes: the same nodes, bit for bit, as
    # pushing the blocks one at a time (and the same tree root as the independent sum)
    rng = np.random.default_rng(seed)
    n_blocks = int(rng.integers(1, 80))
    rows = rng.normal(size=(n_blocks, 3, 2)) * 10.0 ** rng.integers(-8, 8, (n_blocks, 3, 2))
    scalars = rng.normal(size=n_blocks) * 10.0 ** rng.integers(-8, 8, n_blocks)
    for _ in range(10):
        lo = int(rng.integers(0, n_blocks))
        hi = int(rng.integers(lo + 1, n_blocks + 1))
        one_by_one, batched = _Fold(), _Fold()
        for b in range(lo, hi):
            one_by_one.push(b, [scalars[b:b + 1].reshape(()).copy(), rows[b].copy()])
        b0 = lo
        while b0 < hi:
            b1 = min(hi, b0 + int(rng.integers(1, 20)))
            batched.push_batch(b0, [scalars[b0:b1].copy(), rows[b0:b1].copy()])
            batched.detach()
            b0 = b1
        expected, got = one_by_one.nodes(), batched.nodes()
        assert list(got) == list(expected)
        for key in expected:
            for a, b in zip(expected[key], got[key]):
                assert a.shape == b.shape and np.array_equal(a, b) and b.flags.owndata
    fold = _Fold()
    fold.push_batch(0, [scalars.copy(), rows.copy()])
    root = tree_root(fold.nodes(), n_blocks)
    assert root[0] == independent_pairwise(list(scalars))
    assert np.array_equal(root[1], independent_pairwise(list(rows)))
