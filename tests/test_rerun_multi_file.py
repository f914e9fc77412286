"""A rerun on the output of a run of several files reproduces that run (issue 15).

Two simulated files, each numbering partial_id from 0 (so the joined table repeats them)
and each with split partials: `dials.vmerge a.expt a.refl b.expt b.refl`, then
`dials.vmerge scaled.expt scaled.refl` on its output. Before the fix the rerun differed in
two ways (README, issue 15):
  * flags: the rerun looked the previous preparation's exclusions up by original_index as if
    it were a row number, but original_index counts rows within each dataset; datasets 1..n
    read dataset 0's rows and lost `excluded_for_scaling` (1468 rows on 2 x 60k observations,
    one of them suitable, so the selection, Imid and g moved by 0.3-0.5%);
  * last bits: the block sums' key blocks were cut from the counts of the input rows, which
    for a first run include the pieces of split partials that preparation sums; the rerun's
    input holds the summed rows, so its blocks differed (g by 2e-8).
The checks below are against the first run's own output and independent computations
(preparation's summed rows mapped by cctbx, a loop over rows).
"""

import os

import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.io import read_reflections
from test_reruns import run_program

RTOL = 1e-10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("rerun_multi_file")
    for prefix, seed in (("a", 11), ("b", 12)):
        run_program("simulate", ["n_obs_target=20000", f"seed={seed}",
                                 f"output.prefix={prefix}"], work)
    first, rerun = work / "first", work / "rerun"
    first.mkdir()
    rerun.mkdir()
    run_program("vmerge", ["../a.expt", "../a.refl", "../b.expt", "../b.refl"], first)
    run_program("vmerge", ["../first/scaled.expt", "../first/scaled.refl"], rerun)
    return work, first, rerun


def test_the_inputs_repeat_partial_ids_and_hold_split_partials(runs):
    work = runs[0]
    tables = [read_reflections(str(work / f"{p}.refl")) for p in "ab"]
    ids = [np.asarray(t["partial_id"]) for t in tables]
    assert all(i.min() == 0 for i in ids)
    assert np.intersect1d(ids[0], ids[1]).size > 1000  # the joined table repeats them
    for i in ids:
        assert np.unique(i).size < i.size  # pieces of split partials share one


def test_rerun_of_a_two_file_run_reproduces_it(runs):
    _, first, rerun = runs
    a = read_reflections(str(first / "scaled.refl"))
    b = read_reflections(str(rerun / "scaled.refl"))
    assert a.nrows == b.nrows
    for name in ("miller_index", "id", "partial_id"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    np.testing.assert_array_equal(np.asarray(a["flags"]), np.asarray(b["flags"]))
    for name in ("inverse_scale_factor", "intensity.scale.value", "intensity.scale.variance"):
        np.testing.assert_allclose(np.asarray(b[name]), np.asarray(a[name]), rtol=RTOL,
                                   atol=0, err_msg=name)
    # the first run's exclusions survive: rows excluded by the initial filter (judged on the
    # partial pieces) in every dataset, not only in dataset 0
    excluded = a.get_flags(flags.excluded_for_scaling)
    assert np.unique(np.asarray(a["id"])[excluded]).size == 6

    # merged.mtz holds float32: at 1e-10 this asks for the same float32 values, which the
    # two runs give (their float64 results are the same bits)
    import gemmi

    merged = [gemmi.read_mtz_file(str(d / "merged.mtz")) for d in (first, rerun)]
    for label in ("IMEAN", "SIGIMEAN"):
        x, y = (np.asarray(m.column_with_label(label).array, dtype=np.float64) for m in merged)
        assert x.size == y.size > 1000
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=0, err_msg=label)


def test_previous_suitability_is_looked_up_by_dataset_and_position():
    # preparation numbers each dataset's rows from 0 (original_index); the lookup must find
    # the row of that dataset, whatever order the datasets' rows come in
    from dials_vmerge.scaling.prepare import rank_within_dataset
    from dials_vmerge.scaling.rerun import SuitableBefore

    rng = np.random.default_rng(5)
    n = 5000
    ids = rng.choice([0, 3, 7], size=n).astype(np.int32)
    dataset_index = np.searchsorted([0, 3, 7], ids)
    suitable = rng.random(n) < 0.7
    lookup = {}
    counter = {}
    for row, d in enumerate(ids.tolist()):
        position = counter.get(d, 0)
        counter[d] = position + 1
        lookup[(d, position)] = bool(suitable[row])
    before = SuitableBefore(suitable, dataset_index, ids)
    # prepared rows: a subset (summation deletes pieces), in another order
    kept = rng.permutation(n)[: n // 2]
    original_index = rank_within_dataset(dataset_index, n)[kept]
    got = before.of_rows(original_index, ids[kept])
    expected = np.array([lookup[(int(d), int(p))] for d, p in zip(ids[kept], original_index)])
    np.testing.assert_array_equal(got, expected)
    # the row-number reading this replaces gives other answers on a table of three datasets
    assert (suitable[original_index.astype(np.int64)] != expected).sum() > 100
    one = SuitableBefore(suitable)  # one dataset: original_index is the row number
    np.testing.assert_array_equal(one.of_rows(np.arange(n)), suitable)


def _cctbx_keys(miller_index, space_group):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    from dials_vmerge.backends.rank_partition import packed_keys

    hkl = np.asarray(miller_index, dtype=np.int64).reshape(-1, 3)
    indices = flex.miller_index([tuple(int(v) for v in row) for row in hkl])
    asu = miller.set(crystal.symmetry(space_group=space_group), indices,
                     anomalous_flag=False).map_to_asu().indices()
    return packed_keys(np.array(list(asu), dtype=np.int64))


def test_key_blocks_are_cut_from_the_prepared_rows(runs):
    # the partition of the two input files equals the partition of preparation's rows (the
    # pieces of split partials summed per (dataset, partial_id)) and that of the first
    # run's scaled.refl, which a rerun reads
    from dials_vmerge.backends.rank_partition import (keyed_partition, partition_of_counts,
                                                      partition_table)
    from dials_vmerge.geometry import space_group
    from dials_vmerge.io.combine import load_experiments_and_reflections
    from dials_vmerge.pipeline import group_rows_by_dataset
    from dials_vmerge.scaling.prepare import prepare_dataset

    work, first, _ = runs
    files = [str(work / n) for n in ("a.expt", "b.expt", "a.refl", "b.refl")]
    experiments, table = load_experiments_and_reflections(files[:2], files[2:])
    sg = space_group(experiments[0])
    got, _ = keyed_partition(table, sg, 2, chunk_rows=7000)
    sliced = partition_table(table, sg, 2, chunk_rows=7000)

    grouped, dataset_index = group_rows_by_dataset(experiments, table.copy())
    prepared = prepare_dataset(grouped, dataset_index=dataset_index)
    assert prepared.nrows < table.nrows  # partials were summed
    expected = partition_of_counts(
        *np.unique(_cctbx_keys(prepared["miller_index"], sg), return_counts=True), 2)
    assert expected.n_blocks >= 2
    scaled = read_reflections(str(first / "scaled.refl"))
    from_output, _ = keyed_partition(scaled, sg, 2)
    for name in ("block_keys", "block_observations", "rank_blocks"):
        for partition in (got, sliced, from_output):
            assert np.array_equal(getattr(partition, name), getattr(expected, name)), name
    # summed per partial_id alone (the files repeat them) the counts would differ
    pid = np.asarray(table["partial_id"])
    assert np.unique(pid).size < np.unique(np.c_[np.asarray(table["id"]), pid], axis=0).shape[0]
