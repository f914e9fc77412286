"""Issue 11: every scaling job, one process included, sums the minimiser's target over the
read-time key blocks of backends/rank_partition.py, so that N = 1, 2, 3 ranks use the same
blocks (tests/test_mpi_runs.py compares the outputs of real ranks).

Checked here against independent recomputations: the blocks a run's targets use against the
key ranges of the input rows' partition found with a plain loop over the groups' keys
(packed here with numpy, not by the code under test), and a target and gradient summed over
key blocks with empty blocks and groups outside the keys' range against numpy.
"""

import copy
import logging

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.backends import rank_partition
from dials_vmerge.backends.rank_partition import (job_partition, key_blocks_of_groups,
                                                  partition_keys, partition_table)
from dials_vmerge.pipeline import isa_limit_text

LOG = logging.getLogger("test_rank_blocks_in_runs")


def keys_by_numpy(hkl):
    """(h, k, l) -> one int: a lexicographic order with fixed origin (independent of
    rank_partition.packed_keys: plain arithmetic on Python-sized offsets)."""
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3) + (1 << 20)
    return (hkl[:, 0] * (1 << 21) + hkl[:, 1]) * (1 << 21) + hkl[:, 2]


def expected_block_bounds(group_keys, block_keys):
    """Group offsets of the key blocks by a loop: group i belongs to the last block whose
    first key is <= its key (groups before the first block: block 0; after: the last)."""
    n_blocks = len(block_keys) - 1
    block_of_group = []
    for key in group_keys:
        b = 0
        while b + 1 < n_blocks and block_keys[b + 1] <= key:
            b += 1
        block_of_group.append(b)
    block_of_group = np.array(block_of_group, dtype=np.int64)
    return np.array([np.count_nonzero(block_of_group < b) for b in range(n_blocks + 1)])


def scaling_params(*args):
    import iotbx.phil
    from dials_vmerge.cli import load_phil_text

    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


def test_scaling_job_sums_over_the_read_time_key_blocks(monkeypatch):
    from dials_vmerge.geometry import space_group
    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.pipeline import run_scaling_job
    from dials_vmerge.scaling import target as target_module
    from dials_vmerge.simulate import simulate_rotation

    experiments_dict, table, _ = simulate_rotation(n_obs_target=12_000, n_sweeps=3,
                                                   model="physical", seed=2)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    expected_partition = partition_table(table, space_group(experiments[0]), 1)
    assert expected_partition.n_blocks >= 2  # a test of more than one block

    seen_targets, seen_sums = [], []
    real_init, real_sum = target_module.ScalingTarget.__init__, target_module.blockwise_sum

    def spy_init(self, manager, ih_table, nproc=1):
        real_init(self, manager, ih_table, nproc)
        seen_targets.append((np.array(ih_table.asu_index), self.key_blocks))

    def spy_sum(group_start, evaluate, batch_blocks=1, block_bounds=None, n_par=0,
                rank_blocks=None):
        seen_sums.append((block_bounds, rank_blocks))
        return real_sum(group_start, evaluate, batch_blocks, block_bounds, n_par, rank_blocks)

    import dials_vmerge.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "USE_READ_TIME_KEY_BLOCKS", True)
    monkeypatch.setattr(target_module.ScalingTarget, "__init__", spy_init)
    monkeypatch.setattr(target_module, "blockwise_sum", spy_sum)
    run_scaling_job(scaling_params(), experiments, table, LOG)

    assert seen_targets and seen_sums
    block_keys = expected_partition.block_keys
    for group_asu, key_blocks in seen_targets:
        assert key_blocks is not None
        bounds, rank_blocks = key_blocks
        assert np.array_equal(rank_blocks, [0, expected_partition.n_blocks])
        assert np.array_equal(bounds, expected_block_bounds(keys_by_numpy(group_asu),
                                                            block_keys))
    for block_bounds, rank_blocks in seen_sums:
        assert block_bounds is not None and block_bounds.size == expected_partition.n_blocks + 1
        assert np.array_equal(rank_blocks, [0, expected_partition.n_blocks])
    # outside the job, no partition is active: a target cuts blocks from its own table
    assert rank_partition.active_partition() is None


def test_target_over_key_blocks_with_empty_blocks_and_outside_groups_equals_numpy():
    from dials_vmerge.scaling.target import target_and_gradient

    rng = np.random.default_rng(7)
    # the partition's keys: groups spread over (h, k, l) in [-30, 30)^3
    input_hkl = np.unique(rng.integers(-30, 30, (4000, 3)), axis=0)
    input_keys = np.repeat(keys_by_numpy(input_hkl), rng.integers(1, 8, len(input_hkl)))
    partition = partition_keys(input_keys, 1)
    assert partition.n_blocks >= 3
    # a later layout: a third of the input groups (some blocks then hold none) and groups
    # below and above every input key (Friedel mates of an anomalous layout)
    layout_hkl = input_hkl[rng.random(len(input_hkl)) < 0.3]
    layout_hkl = layout_hkl[layout_hkl[:, 0] > 10]  # the low blocks are empty
    layout_hkl = np.concatenate([[[-40, 0, 0], [-35, 3, 1]], layout_hkl, [[40, 0, 0]]])
    group_keys = keys_by_numpy(layout_hkl)
    assert np.all(np.diff(group_keys) > 0)
    multiplicity = rng.integers(1, 6, len(layout_hkl))
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n_obs = int(group_start[-1])
    n_par = 4
    intensity = rng.gamma(2.0, 50.0, n_obs)
    weight = 1.0 / rng.uniform(1.0, 20.0, n_obs)
    g = rng.uniform(0.5, 1.5, n_obs)
    deriv_col = rng.integers(-1, n_par, (n_obs, 2))
    deriv_values = rng.normal(size=(n_obs, 2))

    with job_partition(partition):
        key_blocks = key_blocks_of_groups(layout_hkl)
    bounds, rank_blocks = key_blocks
    assert np.array_equal(bounds, expected_block_bounds(group_keys, partition.block_keys))
    assert np.any(np.diff(bounds) == 0)  # empty blocks are part of the test
    phi, grad = target_and_gradient(intensity, weight, g, deriv_values, deriv_col,
                                    group_start, n_par, nproc=2, key_blocks=key_blocks)

    group = np.repeat(np.arange(len(layout_hkl)), multiplicity)
    ih = (np.bincount(group, weight * g * intensity)
          / np.bincount(group, weight * g * g))[group]
    r = intensity - g * ih
    expected_grad = np.zeros(n_par)
    for k in range(2):
        used = deriv_col[:, k] >= 0
        np.add.at(expected_grad, deriv_col[used, k],
                  (-2.0 * weight * r * ih * deriv_values[:, k])[used])
    assert phi == pytest.approx(np.sum(weight * r * r), rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-9)


def test_key_blocks_refuse_a_layout_not_sorted_by_key():
    partition = partition_keys(keys_by_numpy([[0, 0, 1], [0, 0, 2], [1, 0, 0]]), 1)
    with job_partition(partition):
        with pytest.raises(ValueError, match="not sorted"):
            key_blocks_of_groups([[1, 0, 0], [0, 0, 1]])
    assert key_blocks_of_groups([[1, 0, 0], [0, 0, 1]]) is None  # no job: no key blocks


def test_isa_limit_is_one_over_ab_and_inf_when_b_prints_as_zero():
    assert isa_limit_text(1.2, 0.03) == f"{1.0 / (1.2 * 0.03):.3f}" == "27.778"
    # b ~ 2e-8 and b = 0 (the same printed b, 0.00000) give the same line
    assert isa_limit_text(0.9, 2e-8) == isa_limit_text(0.9, 0.0) == "inf (b < 5e-06)"
    assert isa_limit_text(0.9, 6e-6) == f"{1.0 / (0.9 * 6e-6):.3f}"


def rmeas_by_numpy(group, intensity, sigma):
    """Rmeas over I/sigma > 1, sigma > 0 observations: sum over groups with n > 1 of
    sqrt(n/(n-1)) sum |I - <I>_w| over the sum of I (dials-scaling.md 9)."""
    keep = (sigma > 0) & (intensity / np.where(sigma > 0, sigma, 1.0) > 1.0)
    group, intensity, sigma = group[keep], intensity[keep], sigma[keep]
    w = 1.0 / sigma ** 2
    n = np.bincount(group)
    mean = np.bincount(group, w * intensity) / np.where(n > 0, np.bincount(group, w), 1.0)
    used = n[group] > 1
    deviation = np.bincount(group[used], np.abs(intensity - mean[group])[used],
                            minlength=n.size)
    factor = np.sqrt(n / np.maximum(n - 1.0, 1.0))
    return float(np.sum(factor * deviation)) / float(np.sum(intensity[used]))


def test_imid_rmeas_over_key_blocks_equals_numpy_and_any_nproc():
    from dials_vmerge.scaling.combine import rmeas_sorted

    rng = np.random.default_rng(11)
    hkl = np.unique(rng.integers(-25, 25, (6000, 3)), axis=0)
    multiplicity = rng.integers(1, 9, len(hkl))
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    group = np.repeat(np.arange(len(hkl)), multiplicity)
    truth = rng.gamma(1.5, 200.0, len(hkl))[group]
    sigma = np.sqrt(truth + 25.0) * rng.uniform(0.8, 1.2, group.size)
    intensity = truth + sigma * rng.normal(size=group.size)
    sigma[::97] = 0.0  # excluded rows
    partition = partition_keys(np.repeat(keys_by_numpy(hkl), multiplicity), 1)
    assert partition.n_blocks >= 4
    with job_partition(partition):
        key_blocks = key_blocks_of_groups(hkl)
    scores = [rmeas_sorted(intensity, sigma, group_start, nproc, key_blocks)
              for nproc in (1, 2, 3)]
    assert scores[0] == scores[1] == scores[2]  # the same bits for any nproc
    assert scores[0] == pytest.approx(rmeas_by_numpy(group, intensity, sigma), rel=1e-12)
    # the per-thread chunks (no job partition) give the same Rmeas up to rounding
    assert rmeas_sorted(intensity, sigma, group_start, 2) == pytest.approx(scores[0],
                                                                         rel=1e-13)
