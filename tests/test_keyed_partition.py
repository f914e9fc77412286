"""Issue 11: the read-time partition pass keeps each input row's non-anomalous key, and the
scaling job's grouping takes its ASU index from those keys instead of mapping the rows again
(backends/rank_partition.py keyed_partition, InputRowKeys).

Checked against independent computations: the partition of the sliced two-pass
`partition_table`, np.unique for the counted distinct keys, cctbx's mapping
(ih_table.map_indices_to_asu) for the looked-up ASU indices, and a scaling job whose
grouping maps the rows itself (same bits).
"""

import copy
import logging

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.backends import rank_partition
from dials_vmerge.backends.rank_partition import (_distinct_key_counts, job_partition,
                                                  keyed_partition, partition_asu_of_rows,
                                                  partition_table)

LOG = logging.getLogger("test_keyed_partition")


@pytest.fixture(scope="module")
def simulated_files(tmp_path_factory):
    from dials_vmerge.simulate import simulate_rotation, write_outputs

    work = tmp_path_factory.mktemp("keyed")
    experiments, table, truth = simulate_rotation(n_obs_target=12_000, n_sweeps=2,
                                                  model="physical", seed=4)
    write_outputs(experiments, table, truth, str(work / "in.expt"), str(work / "in.refl"),
                  str(work / "truth.h5"))
    return str(work / "in.expt"), str(work / "in.refl")


def read(files):
    from dials_vmerge.geometry import space_group
    from dials_vmerge.io import read_experiments, read_reflections

    experiments = read_experiments(files[0])
    return experiments, read_reflections(files[1]), space_group(experiments[0])


def test_distinct_key_counts_equal_numpy_unique():
    rng = np.random.default_rng(3)
    hkl = rng.integers(-50, 50, (20000, 3))
    keys = rank_partition.packed_keys(hkl)
    expected = np.unique(keys, return_counts=True)
    got = _distinct_key_counts(keys)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    # a box far larger than the rows: the np.unique path, same answer
    sparse = rank_partition.packed_keys(np.array([[-900000, 0, 0], [3, 4, 5], [900000, 7, 1],
                                                  [3, 4, 5]]))
    got = _distinct_key_counts(sparse)
    assert np.array_equal(got[0], np.unique(sparse)) and list(got[1]) == [1, 2, 1]
    assert _distinct_key_counts(np.zeros(0, np.int64))[0].size == 0


@pytest.mark.parametrize("n_ranks", [1, 2, 3])
def test_keyed_partition_equals_the_sliced_partition(simulated_files, n_ranks):
    _, table, sg = read(simulated_files)
    expected = partition_table(table, sg, n_ranks, chunk_rows=5000)
    got, row_keys = keyed_partition(table, sg, n_ranks, chunk_rows=5000)
    assert expected.n_blocks >= 2
    for name in ("block_keys", "block_observations", "rank_blocks"):
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
    assert row_keys is not None


def test_asu_of_later_rows_equals_cctbx_mapping(simulated_files):
    from dials_vmerge.scaling.ih_table import map_indices_to_asu

    _, table, sg = read(simulated_files)
    partition, row_keys = keyed_partition(table, sg, 1)
    # a later table: a reordered subset of the rows (selection, grouping by dataset), its
    # miller_index still in the file
    rng = np.random.default_rng(1)
    later = table.select(rng.permutation(table.nrows)[: table.nrows // 2])
    rows = np.sort(rng.choice(later.nrows, later.nrows // 3, replace=False))
    expected = map_indices_to_asu(later.peek("miller_index", rows), sg, False)
    with job_partition(partition, row_keys):
        got = partition_asu_of_rows(later, rows, release=False)
    assert got.dtype == np.int32 and np.array_equal(got, expected)
    # outside a job, or a miller_index held in memory (no file rows): the caller maps
    assert partition_asu_of_rows(later, rows) is None
    later["miller_index"] = later["miller_index"]  # materialised: now in memory
    with job_partition(partition, row_keys):
        assert partition_asu_of_rows(later, rows, release=False) is None
    # a table of rows the partition never saw (another file's blob): no keys
    _, other, _ = read(simulated_files)
    with job_partition(partition, row_keys):
        assert partition_asu_of_rows(other, rows, release=False) is None
    # the one look-up of a job gives the keys back: a second one maps
    again = table.select(np.arange(table.nrows))
    with job_partition(partition, row_keys):
        assert np.array_equal(partition_asu_of_rows(again, rows), expected_rows(again, rows, sg))
        assert row_keys.keys_by_file_row is None
        assert partition_asu_of_rows(again, rows) is None


def expected_rows(table, rows, sg):
    from dials_vmerge.scaling.ih_table import map_indices_to_asu

    return map_indices_to_asu(table.peek("miller_index", rows), sg, False)


def test_scaling_job_reusing_the_partition_keys_gives_the_same_bits(simulated_files,
                                                                   monkeypatch):
    import dials_vmerge.pipeline as pipeline_module
    from dials_vmerge.pipeline import run_scaling_job
    from test_rank_blocks_in_runs import scaling_params

    monkeypatch.setattr(pipeline_module, "USE_READ_TIME_KEY_BLOCKS", True)
    used = []
    real_lookup = rank_partition.partition_asu_of_rows

    def spy(table, rows):
        asu = real_lookup(table, rows)
        used.append(asu is not None)
        return asu

    monkeypatch.setattr(rank_partition, "partition_asu_of_rows", spy)
    experiments, table, _ = read(simulated_files)
    _, reused, _ = run_scaling_job(scaling_params(), copy.deepcopy(experiments), table, LOG)
    assert used == [True]  # the grouping took the keys

    real_keyed = pipeline_module.read_time_keyed_partition
    monkeypatch.setattr(pipeline_module, "read_time_keyed_partition",
                        lambda e, t: (real_keyed(e, t)[0], None))  # same blocks, no keys
    experiments, table, _ = read(simulated_files)
    _, mapped, _ = run_scaling_job(scaling_params(), copy.deepcopy(experiments), table, LOG)
    assert used == [True, False]
    for name in ("inverse_scale_factor", "inverse_scale_factor_variance", "flags"):
        assert np.array_equal(reused.peek(name), mapped.peek(name)), name
