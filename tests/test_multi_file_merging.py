"""Several DIALS files given together: partials summed per (dataset, partial_id), the merged
MTZ checked against an independent merge, and reruns on our own multi-dataset output."""

import os

import numpy as np
import pytest

from quartz_helpers import two_quartz_sweep_paths
from dials_vmerge import flags
from dials_vmerge.io import read_experiments, read_reflections

gemmi = pytest.importorskip("gemmi")


def run_in(directory, args):
    from dials_vmerge.command_line.vmerge import main

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main([str(a) for a in args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def two_sweep_run(tmp_path_factory):
    """dials.vmerge on the quartz sweep given twice, as two files whose tables both use id 0
    and both number partial_id from 0."""
    work = tmp_path_factory.mktemp("two_sweeps")
    expts, refls = two_quartz_sweep_paths(work)
    assert run_in(work, [expts[0], refls[0], expts[1], refls[1]]) == 0
    return work


def independent_merge(table, space_group_symbol, unit_cell):
    """{cctbx ASU (H, K, L): IMEAN} from the scaled rows, written with numpy and cctbx alone:
    rows not bad for scaling with g > 0 and V > 0; partials of one (id, partial_id) summed
    (I/g and V/g^2 added, kept if the summed partiality >= 0.4, as dials.merge); then the
    inverse-variance mean per non-anomalous ASU index."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    g = table["inverse_scale_factor"]
    v = table["intensity.scale.variance"]
    keep = ~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0) & (v > 0)
    rows = np.flatnonzero(keep)
    sums = {}
    for r in rows:
        key = (int(table["id"][r]), int(table["partial_id"][r]))
        entry = sums.setdefault(key, [r, 0.0, 0.0, 0.0])
        entry[1] += table["intensity.scale.value"][r] / g[r]
        entry[2] += v[r] / g[r] ** 2
        entry[3] += table["partiality"][r]
    kept = [e for e in sums.values() if e[3] >= 0.4]
    indices = flex.miller_index([tuple(int(x) for x in table["miller_index"][e[0]]) for e in kept])
    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group_symbol=space_group_symbol)
    asu = miller.set(symmetry, indices, anomalous_flag=False).map_to_asu().indices()
    num, den = {}, {}
    for hkl, e in zip(asu, kept):
        num[hkl] = num.get(hkl, 0.0) + e[1] / e[2]
        den[hkl] = den.get(hkl, 0.0) + 1.0 / e[2]
    return {hkl: num[hkl] / den[hkl] for hkl in num}, len(kept), len(rows)


def test_two_files_merge_partials_per_dataset(two_sweep_run):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    table = read_reflections(str(two_sweep_run / "scaled.refl"))
    assert set(np.unique(table["id"])) == {0, 1}
    # Both files number partial_id from 0: the same partial_id appears in both datasets.
    assert np.intersect1d(table["partial_id"][table["id"] == 0],
                          table["partial_id"][table["id"] == 1]).size > 1000
    mtz = gemmi.read_mtz_file(str(two_sweep_run / "merged.mtz"))
    cell = tuple(mtz.cell.parameters)
    expected, n_observations, n_rows = independent_merge(table, mtz.spacegroup.hm, cell)
    assert n_observations < n_rows  # split partials were present and summed
    data = np.array(mtz)
    labels = [c.label for c in mtz.columns]
    symmetry = crystal.symmetry(unit_cell=cell, space_group_symbol=mtz.spacegroup.hm)
    hkl = flex.miller_index([tuple(int(x) for x in row) for row in data[:, :3]])
    asu = miller.set(symmetry, hkl, anomalous_flag=False).map_to_asu().indices()
    imean = data[:, labels.index("IMEAN")]
    ours = {h: i for h, i in zip(asu, imean)}
    assert set(ours) == set(expected)  # every unique reflection present, no others
    got = np.array([ours[h] for h in expected])
    want = np.array([expected[h] for h in expected])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    # N counts the merged observations (one per summed partial group).
    n = data[:, labels.index("N")]
    assert int(n.sum()) == n_observations
    # Fewer than 40 000 suitable reflections over two datasets: method=auto uses them all.
    assert "Reflection selection (use_all)" in (two_sweep_run / "dials.vmerge.log").read_text()


def image_numbers(table):
    """Image number of each row from its observed z (image i spans z in [i - 1, i))."""
    return np.floor(table["xyzobs.px.value"][:, 2]).astype(int) + 1


def test_reruns_compose_on_two_dataset_output(two_sweep_run, tmp_path):
    """Run, rerun with exclude_batches at the end of one dataset, rerun again with a range at
    the end of the other, all with default settings; the excluded rows stay flagged."""
    experiments = read_experiments(str(two_sweep_run / "scaled.expt"))
    offsets = [e.scan["batch_offset"] for e in experiments]
    last = [e.scan["image_range"][1] for e in experiments]
    first_rerun, second_rerun = tmp_path / "rerun1", tmp_path / "rerun2"
    first_rerun.mkdir()
    second_rerun.mkdir()
    end0 = (last[0] - 9 + offsets[0], last[0] + offsets[0])  # images 91-100 of dataset 0
    end1 = (last[1] - 19 + offsets[1], last[1] + offsets[1])  # images 81-100 of dataset 1
    assert run_in(first_rerun, [two_sweep_run / "scaled.expt", two_sweep_run / "scaled.refl",
                                f"exclude_batches={end0[0]},{end0[1]}"]) == 0
    assert run_in(second_rerun, [first_rerun / "scaled.expt", first_rerun / "scaled.refl",
                                 f"exclude_batches={end1[0]},{end1[1]}"]) == 0
    table = read_reflections(str(second_rerun / "scaled.refl"))
    image = image_numbers(table)
    user_excluded = table.get_flags(flags.user_excluded_in_scaling)
    in_end0 = (table["id"] == 0) & (image > last[0] - 10)
    in_end1 = (table["id"] == 1) & (image > last[1] - 20)
    assert in_end0.sum() > 50 and in_end1.sum() > 100
    assert user_excluded[in_end0].all() and user_excluded[in_end1].all()
    assert not table.get_flags(flags.scaled)[in_end0 | in_end1].any()
    ranges = [e.scan["valid_image_ranges"][e.identifier]
              for e in read_experiments(str(second_rerun / "scaled.expt"))]
    assert ranges == [[[1, last[0] - 10]], [[1, last[1] - 20]]]


@pytest.mark.parametrize("with_partial_id", [False, True])
def test_merging_applies_partiality_cut_without_split_partials(with_partial_id):
    """Observations with partiality < 0.4 are left out of merging whether or not the table
    has a partial_id column (stills from most integrators have none), as dials.merge."""
    from command_line_helpers import quartz_scaled
    from dials_vmerge.merging.api import scaled_observations

    expt, refl = quartz_scaled()
    experiments = read_experiments(expt)
    table = read_reflections(refl)
    if with_partial_id:
        table["partial_id"] = np.arange(table.nrows, dtype=np.uint64)  # nothing split
    else:
        table.del_column("partial_id")
    before = len(scaled_observations(table, experiments).intensity)
    g = table["inverse_scale_factor"]
    good = np.flatnonzero(~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0)
                          & (table["intensity.scale.variance"] > 0)
                          & (table["partiality"] >= 0.4))
    low = good[::7]
    partiality = table["partiality"].copy()
    partiality[low] = 0.39
    table["partiality"] = partiality
    after = scaled_observations(table, experiments)
    assert len(after.intensity) == before - len(low)
    expected_rows = np.setdiff1d(good, low)
    np.testing.assert_allclose(
        np.sort(after.intensity),
        np.sort(table["intensity.scale.value"][expected_rows] / g[expected_rows]), rtol=1e-12)
    assert np.all(after.extra["FRACTIONCALC"] >= 0.4)


def test_preparation_sums_partials_per_dataset():
    """Two datasets of one table both use partial_id 0 and 1: pieces are summed within each
    dataset, never across (scaling.prepare.sum_partial_reflections)."""
    from dials_vmerge.scaling.prepare import sum_partial_reflections
    from dials_vmerge.table import ReflectionTable

    table = ReflectionTable(8, {0: "a", 1: "b"})
    table["id"] = np.array([0, 0, 1, 1, 0, 1, 0, 1], dtype=np.int32)
    table["partial_id"] = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint64)
    table["partiality"] = np.array([0.5, 0.4, 0.3, 0.6, 0.7, 0.2, 0.25, 0.7])
    table["intensity.sum.value"] = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    table["intensity.sum.variance"] = np.arange(1.0, 9.0)
    out = sum_partial_reflections(table)
    assert out.nrows == 4
    # the kept rows are each group's first piece (rows 0, 2, 4, 5), in table order
    assert out["id"].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(out["intensity.sum.value"], [30.0, 70.0, 120.0, 140.0])
    np.testing.assert_allclose(out["intensity.sum.variance"], [3.0, 7.0, 12.0, 14.0])
    np.testing.assert_allclose(out["partiality"], [0.9, 0.9, 0.95, 0.9])


@pytest.mark.parametrize("largest_partial_id", [40, 2 ** 63 + 5])
def test_partial_groups_are_dataset_and_partial_id_pairs(largest_partial_id):
    """merging.api.partial_groups against a dictionary grouping, for partial_ids small enough
    for the combined sort key and for uint64 values beyond it (the two-key sort)."""
    from dials_vmerge.merging.api import partial_groups
    from dials_vmerge.table import ReflectionTable

    rng = np.random.default_rng(4)
    n = 400
    table = ReflectionTable(n, {0: "a", 1: "b", 2: "c"})
    table["id"] = rng.integers(0, 3, n).astype(np.int32)
    pid = rng.integers(0, 41, n).astype(np.uint64)
    pid[pid == 40] = np.uint64(largest_partial_id)
    table["partial_id"] = pid
    rows = np.flatnonzero(rng.random(n) < 0.9)
    inverse, first = partial_groups(table, rows)
    first_row_of = {}
    for position, r in enumerate(rows):
        first_row_of.setdefault((int(table["id"][r]), int(pid[r])), position)
    assert len(first) == len(first_row_of)
    assert sorted(first.tolist()) == sorted(first_row_of.values())
    for position, r in enumerate(rows):
        assert first[inverse[position]] == first_row_of[(int(table["id"][r]), int(pid[r]))]
