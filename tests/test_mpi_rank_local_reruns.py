"""Reruns on scaled data (`dials.vmerge scaled.expt scaled.refl ...`) under mpiexec run
rank-local (issue 11): each rank holds only the rows of its own unique reflections, and the
outputs are those of a one-process rerun byte for byte.

A rerun looks up which rows the previous run's preparation kept (scaling/rerun.py,
SuitableBefore) by preparation's `original_index`, the row's position among ALL rows of its
dataset. A rank holds only some of those rows (pipeline.rank_local_rows gives them their
one-process numbers), so the look-up goes by the explicit (dataset, original_index) values,
not by position among the rows held.

The first run is one process on two simulated files (two sweeps each, split partials, each
file numbering partial_id from 0; tests/test_rerun_multi_file.py). Its output is rerun as one
process without a launcher and under 2 and 3 ranks: with no option, with exclude_batches, and
with cut_data.min_isigi=3, which makes this run's initial filter exclude thousands of rows that
the previous preparation kept; restart_prepared_table looks each up and keeps the flag where
the row's I/sigma is below the new cut (issue 15, tests/test_rerun_stricter_cuts.py), so
each rank must take the same decisions as one process.
scaled.refl, scaled.expt and merged.mtz must be byte-identical to the one-process rerun's,
the log must say that the scaling ran on each rank's own rows, and the log must equal the
one-process log apart from MPI lines and timings. A rerun of 80 KB-scaled stills with
exclude_datasets=3 under 3 ranks is checked the same way.
"""

import filecmp

import numpy as np
import pytest

import mpi_helpers
from dials_vmerge import flags

pytest.importorskip("mpi4py")

TIMEOUT_S = 180
RANK_LOCAL_LINE = "MPI: scaling each rank's own unique reflections"
OUTPUTS = ("scaled.refl", "scaled.expt", "merged.mtz")
# datasets: a.refl's two sweeps (batches 1-53, 101-153), then b.refl's (201-253, 301-353)
RERUNS = {
    "no_options": [],
    "exclude_batches": ["exclude_batches=221,230"],
    "min_isigi": ["cut_data.min_isigi=3"],
}
CASES = [(name, n) for name in RERUNS for n in (2, 3)
         if not (name == "min_isigi" and n == 2)]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Directory of the first run (one process, two files)."""
    work = tmp_path_factory.mktemp("rerun_rank_local")
    for prefix, seed in (("a", 11), ("b", 12)):
        done = mpi_helpers.run(["dials.vmerge.simulate", "rotation.n_sweeps=2",
                                "n_obs_target=4000", f"seed={seed}",
                                f"output.prefix={prefix}"], work, timeout_s=TIMEOUT_S)
        assert done.returncode == 0, done.stderr
    out = work / "first"
    out.mkdir()
    done = mpi_helpers.run(["dials.vmerge", "../a.expt", "../a.refl", "../b.expt", "../b.refl",
                            "nproc=1"], out, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def rerun(first, tmp_path_factory):
    """rerun(name, n_ranks or None): directory of that rerun of the first run's output (each
    run once per module)."""
    done_runs = {}

    def run(name, n_ranks):
        if (name, n_ranks) not in done_runs:
            d = tmp_path_factory.mktemp(f"{name}_{n_ranks}")
            done = mpi_helpers.run(["dials.vmerge", str(first / "scaled.expt"),
                                    str(first / "scaled.refl"), "nproc=1"] + RERUNS[name],
                                   d, n_ranks=n_ranks, timeout_s=TIMEOUT_S)
            assert done.returncode == 0, done.stderr
            done_runs[name, n_ranks] = d
        return done_runs[name, n_ranks]

    return run


def assert_rank_local_and_equal(one, many):
    log = (many / "dials.vmerge.log").read_text()
    assert RANK_LOCAL_LINE in log
    assert RANK_LOCAL_LINE not in (one / "dials.vmerge.log").read_text()
    for output in OUTPUTS:
        assert filecmp.cmp(one / output, many / output, shallow=False), output
    assert (mpi_helpers.comparable_log(many / "dials.vmerge.log")
            == mpi_helpers.comparable_log(one / "dials.vmerge.log"))


@pytest.mark.parametrize("name,n_ranks", CASES)
def test_rerun_under_ranks_is_rank_local_and_equals_one_process(rerun, name, n_ranks):
    assert_rank_local_and_equal(rerun(name, None), rerun(name, n_ranks))


def test_stills_rerun_with_a_dataset_excluded_under_three_ranks(tmp_path):
    # 80 KB-scaled stills (one dataset per image, ~250 rows each, every rank holding a
    # little of each): the previous exclusions are looked up per image dataset, with
    # dataset 3 dropped by the rerun's selection
    for d in ("first", "one", "ranks3"):
        (tmp_path / d).mkdir()
    done = mpi_helpers.run(["dials.vmerge.simulate", "mode=stills", "stills.n_images=80",
                            "model=KB", "crystal.d_min=3", "seed=4"], tmp_path,
                           timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    done = mpi_helpers.run(["dials.vmerge", "../simulated.expt", "../simulated.refl",
                            "nproc=1"], tmp_path / "first", timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    args = ["dials.vmerge", "../first/scaled.expt", "../first/scaled.refl", "nproc=1",
            "exclude_datasets=3"]
    for d, n_ranks in (("one", None), ("ranks3", 3)):
        done = mpi_helpers.run(args, tmp_path / d, n_ranks=n_ranks, timeout_s=TIMEOUT_S)
        assert done.returncode == 0, done.stderr
    assert_rank_local_and_equal(tmp_path / "one", tmp_path / "ranks3")
    rows = [int(n) for n in mpi_helpers.RANK_ROWS.search(
        (tmp_path / "ranks3" / "dials.vmerge.log").read_text()).group(1).split(" / ")]
    assert len(rows) == 3 and min(rows) > 0
    import json

    n_experiments = [len(json.load(open(tmp_path / d / "scaled.expt"))["experiment"])
                     for d in ("first", "ranks3")]
    assert n_experiments == [80, 79]


def test_the_options_act_on_the_rerun(first, rerun):
    # the reruns compared above are not one run three times: exclude_batches flags the rows
    # of batches 221-230 (dataset 2, images 21-30) and changes the result
    from dials_vmerge.io import read_reflections

    plain = read_reflections(str(rerun("no_options", None) / "scaled.refl"))
    excluded = read_reflections(str(rerun("exclude_batches", None) / "scaled.refl"))
    newly = (excluded.get_flags(flags.user_excluded_in_scaling)
             & ~plain.get_flags(flags.user_excluded_in_scaling))
    z = np.asarray(excluded["xyzobs.px.value"])[:, 2]
    ids = np.unique(np.asarray(excluded["id"])[newly])
    assert newly.sum() > 50 and ids.size == 1
    assert np.all((z[newly] >= 20) & (z[newly] <= 30))
    assert not np.array_equal(np.asarray(plain["inverse_scale_factor"]),
                              np.asarray(excluded["inverse_scale_factor"]))


def test_min_isigi_rerun_makes_the_lookup_decide_many_rows(first):
    # rows the first run's preparation kept whose I/sigma (sum or profile, as the initial
    # filter with intensity_choice=combine judges) is below 3: this rerun's filter flags
    # them, and restart_prepared_table looks each up (by dataset and original_index); the
    # flag stays on them, a stricter cut given on the rerun (issue 15)
    from dials_vmerge.io import read_reflections
    from dials_vmerge.scaling.rerun import PREPARATION_FLAGS

    table = read_reflections(str(first / "scaled.refl"))
    kept = ~table.get_flags(PREPARATION_FLAGS, all=False)
    below = np.zeros(table.nrows, dtype=bool)
    for kind in ("sum", "prf"):
        value = np.asarray(table[f"intensity.{kind}.value"])
        variance = np.asarray(table[f"intensity.{kind}.variance"])
        with np.errstate(divide="ignore", invalid="ignore"):
            below |= (variance > 0) & (value / np.sqrt(variance) < 3)
    assert (kept & below).sum() > 1000


def test_lookup_of_a_ranks_own_rows_equals_one_process():
    # Datasets interleave in input order; a rank holds the rows of a key range (here a
    # random key per row). One process numbers each dataset's rows after grouping by
    # dataset; a rank's rows carry those numbers (positions_within_dataset). Prepared rows
    # (a subset: summation removes pieces) looked up on the rank must give the previous
    # suitability of the same input row, as a plain dictionary over the input rows does.
    from dials_vmerge.backends.rank_partition import positions_within_dataset
    from dials_vmerge.scaling.prepare import rank_within_dataset
    from dials_vmerge.scaling.rerun import SuitableBefore
    from dials_vmerge.table import ReflectionTable

    rng = np.random.default_rng(21)
    n = 12000
    dataset_ids = np.array([0, 3, 7])
    ids = rng.choice(dataset_ids, size=n, p=[0.5, 0.3, 0.2]).astype(np.int32)
    key = rng.integers(0, 1000, size=n)
    suitable = rng.random(n) < 0.8
    table = ReflectionTable(n)
    table["id"] = ids
    truth, counter = {}, {}
    for row, d in enumerate(ids.tolist()):
        truth[d, counter.get(d, 0)] = bool(suitable[row])
        counter[d] = counter.get(d, 0) + 1

    def grouped(rows):
        # group_rows_by_dataset: dataset by dataset (experiment order), input order within
        order = rows[np.argsort(np.searchsorted(dataset_ids, ids[rows]), kind="stable")]
        return order, np.searchsorted(dataset_ids, ids[order])

    all_rows, all_dataset = grouped(np.arange(n))
    one = SuitableBefore(suitable[all_rows], all_dataset, ids[all_rows])
    one_index = rank_within_dataset(all_dataset, n)
    one_index_of_row = np.empty(n, np.int64)
    one_index_of_row[all_rows] = one_index.astype(np.int64)
    n_wrong_by_position = 0
    for lo, hi in ((0, 300), (300, 700), (700, 1000)):
        held = np.flatnonzero((key >= lo) & (key < hi))
        rows, dataset = grouped(held)
        original_index = positions_within_dataset(table, held)
        original_index = original_index[np.searchsorted(held, rows)]
        assert np.array_equal(original_index, one_index_of_row[rows])
        on_rank = SuitableBefore(suitable[rows], dataset, ids[rows],
                                 original_index.astype(np.uint64))
        prepared = rng.permutation(rows.size)[: rows.size * 2 // 3]
        got = on_rank.of_rows(original_index[prepared].astype(np.uint64), ids[rows][prepared])
        expected = np.array([truth[int(d), int(i)] for d, i in
                             zip(ids[rows][prepared], original_index[prepared])])
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(
            one.of_rows(original_index[prepared].astype(np.uint64), ids[rows][prepared]),
            expected)
        # numbered by position among the rank's own rows (the one-process construction on a
        # rank's table) the same prepared rows are not found or find other rows
        by_position = SuitableBefore(suitable[rows], dataset, ids[rows])
        try:
            wrong = by_position.of_rows(original_index[prepared].astype(np.uint64),
                                        ids[rows][prepared])
            n_wrong_by_position += int((wrong != expected).sum())
        except ValueError:
            n_wrong_by_position += prepared.size
    assert n_wrong_by_position > 100
    # a rank holding no row, and a rank without one dataset's rows (id 7)
    nothing = SuitableBefore(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.int32),
                             np.zeros(0, np.uint64))
    assert nothing.of_rows(np.zeros(0, np.uint64), np.zeros(0, np.int32)).size == 0
    held = np.flatnonzero((key < 500) & (ids != 7))
    rows, dataset = grouped(held)
    original_index = one_index_of_row[rows].astype(np.uint64)
    on_rank = SuitableBefore(suitable[rows], dataset, ids[rows], original_index)
    expected = np.array([truth[int(d), int(i)] for d, i in zip(ids[rows], original_index)])
    np.testing.assert_array_equal(on_rank.of_rows(original_index, ids[rows]), expected)
    # a (dataset, original_index) the table before preparation did not hold is an error
    with pytest.raises(ValueError, match="not among"):
        one.of_rows(np.array([n], np.uint64), np.array([0]))
