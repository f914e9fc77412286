"""Our MTZ files as the rest of the ecosystem reads them (issue 15, test 1).

* iotbx.merging_statistics (cctbx's own program, not our statistics code) on our
  unmerged.mtz reproduces our log's overall and per-shell <I/sigma>, Rmerge and CC1/2;
* gemmi reads both files with the expected columns, types, cell, symmetry, batch headers
  (cell, phi range, wavelength, detector: what dials.export writes) and header fields;
* dials.vmerge.merge on our unmerged.mtz gives the merged.mtz of scaled.refl.
"""

import json
import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401
from quartz_helpers import quartz_scaled_observations  # noqa: F401  (shared data helpers)
from command_line_helpers import quartz_scaled

gemmi = pytest.importorskip("gemmi")

UNMERGED_COLUMNS = [("H", "H"), ("K", "H"), ("L", "H"), ("M/ISYM", "Y"), ("BATCH", "B"),
                    ("I", "J"), ("SIGI", "Q"), ("SCALEUSED", "R"), ("SIGSCALEUSED", "R"),
                    ("BG", "R"), ("SIGBG", "R"), ("FRACTIONCALC", "R"), ("XDET", "R"),
                    ("YDET", "R"), ("ROT", "R"), ("LP", "R"), ("QE", "R")]


@pytest.fixture(scope="module")
def merged_from_refl(tmp_path_factory):
    from dials_vmerge.command_line.merge import main

    work = tmp_path_factory.mktemp("from_refl")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        expt, refl = quartz_scaled()
        assert main([expt, refl, "unmerged_mtz=unmerged.mtz"]) == 0
    finally:
        os.chdir(cwd)
    with open(work / "dials.vmerge.merge.json") as f:
        report = json.load(f)
    return work, report["merging_statistics"]


def test_iotbx_merging_statistics_reproduces_our_log(merged_from_refl):
    from iotbx import merging_statistics
    from iotbx.reflection_file_reader import any_reflection_file

    work, ours = merged_from_refl
    arrays = any_reflection_file(str(work / "unmerged.mtz")).as_miller_arrays(
        merge_equivalents=False)
    intensities = [a for a in arrays if a.info().labels == ["I", "SIGI"]][0]
    # dials.merge's settings: sigmas from the observations, no systematic-absence removal,
    # 20 shells of equal volume over the data's range
    result = merging_statistics.dataset_statistics(
        i_obs=intensities, n_bins=20, use_internal_variance=False,
        eliminate_sys_absent=False, assert_is_not_unique_set_under_symmetry=False)
    shells = [(s.i_over_sigma_mean, s.r_merge, s.cc_one_half, s.n_obs) for s in result.bins]
    assert len(shells) == len(ours["shells"]) == 20
    for theirs, mine in zip(shells + [(result.overall.i_over_sigma_mean, result.overall.r_merge,
                                       result.overall.cc_one_half, result.overall.n_obs)],
                            ours["shells"] + [ours["overall"]]):
        assert theirs[3] == mine["n_obs"]
        assert theirs[0] == pytest.approx(mine["i_over_sigma_mean"], rel=1e-3)
        assert theirs[1] == pytest.approx(mine["r_merge"], rel=1e-3)
        if mine["cc_half"] is not None:  # undefined in a shell without pairs
            # the same random half-split: the file keeps each reflection's observations in
            # our order (stable sort), cctbx's split stream is the one we reproduce
            assert theirs[2] == pytest.approx(mine["cc_half"], rel=1e-3)
    assert result.overall.n_obs == 1401


def test_gemmi_reads_unmerged_columns_batches_and_header(merged_from_refl):
    from dials_vmerge.io import read_experiments

    work, _ = merged_from_refl
    mtz = gemmi.read_mtz_file(str(work / "unmerged.mtz"))
    assert [(c.label, c.type) for c in mtz.columns] == UNMERGED_COLUMNS
    assert mtz.spacegroup.hm == "P 31 2 1"
    assert mtz.cell.parameters == pytest.approx((4.9249, 4.9249, 5.4014, 90, 90, 120),
                                                abs=2e-4)
    assert mtz.sort_order == [1, 2, 3, 0, 0]
    assert mtz.history and "dials.vmerge.merge" in mtz.history[0]
    assert "classical" in mtz.history[0]
    dataset = mtz.datasets[-1]
    assert (dataset.project_name, dataset.crystal_name, dataset.dataset_name) == (
        "DIALS", "XTAL", "NATIVE")
    # one header per image of the valid range (quartz: images 1-100), numbered as BATCH
    numbers = [b.number for b in mtz.batches]
    assert numbers == list(range(1, 101))
    batch_column = np.array(mtz.column_with_label("BATCH"))
    assert set(batch_column.astype(int)) <= set(numbers)
    experiment = read_experiments(quartz_scaled()[0])[0]
    start, width = experiment.scan["oscillation"]
    for b in (mtz.batches[0], mtz.batches[57]):
        floats = [b.floats[i] for i in range(len(b.floats))]
        assert floats[:6] == pytest.approx((4.9249, 4.9249, 5.4014, 90, 90, 120), abs=2e-4)
        # the Mosflm U is a rotation
        u = np.array(floats[6:15]).reshape(3, 3).T
        np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-5)
        assert floats[36] == pytest.approx(start + (b.number - 1) * width, abs=1e-4)  # phistt
        assert floats[37] - floats[36] == pytest.approx(width, abs=1e-5)  # phiend
        assert b.wavelength == pytest.approx(experiment.beam["wavelength"], rel=1e-6)
        assert np.linalg.norm(floats[38:41]) == pytest.approx(1.0, abs=1e-5)  # scan axis
        assert floats[111] > 0 and floats[114] > 0 and floats[116] > 0  # detector
    # I/g and sigma/g (dials.export): g times I reproduces intensity.scale.value of a row
    data = np.array(mtz)
    labels = [c.label for c in mtz.columns]
    scale = data[:, labels.index("SCALEUSED")]
    assert np.all(scale > 0) and np.ptp(scale) > 0.1
    for column in mtz.columns:
        values = data[:, labels.index(column.label)]
        assert column.min_value == pytest.approx(np.nanmin(values))
        assert column.max_value == pytest.approx(np.nanmax(values))


def test_unmerged_intensities_are_scaled_as_dials_export(merged_from_refl):
    """The file's I is intensity.scale.value / g of the same observation (not I * g)."""
    from dials_vmerge.io import read_reflections
    from dials_vmerge import flags

    work, _ = merged_from_refl
    mtz = gemmi.read_mtz_file(str(work / "unmerged.mtz"))
    data = np.array(mtz)
    labels = [c.label for c in mtz.columns]
    table = read_reflections(quartz_scaled()[1])
    good = ~table.get_flags(flags.bad_for_scaling, all=False)
    full = good & (np.asarray(table["partiality"]) > 0.99)
    scaled = (np.asarray(table["intensity.scale.value"])[full]
              / np.asarray(table["inverse_scale_factor"])[full])
    # every fully recorded observation's I/g is in the file, by value
    file_i = np.sort(data[:, labels.index("I")])
    where = np.clip(np.searchsorted(file_i, scaled.astype(np.float32)), 0, len(file_i) - 1)
    assert np.allclose(file_i[where], scaled, rtol=1e-6)


def test_merging_our_unmerged_mtz_gives_the_merged_mtz_of_scaled_refl(merged_from_refl,
                                                                       tmp_path, monkeypatch):
    from dials_vmerge.command_line.merge import main

    work, ours = merged_from_refl
    monkeypatch.chdir(tmp_path)
    assert main([str(work / "unmerged.mtz")]) == 0
    with open("dials.vmerge.merge.json") as f:
        again = json.load(f)["merging_statistics"]
    for key in ("n_obs", "i_over_sigma_mean", "r_merge", "cc_half"):
        assert again["overall"][key] == pytest.approx(ours["overall"][key], rel=1e-6)
    a = gemmi.read_mtz_file(str(work / "merged.mtz"))
    b = gemmi.read_mtz_file("merged.mtz")
    labels = [c.label for c in a.columns]
    assert labels == [c.label for c in b.columns]
    da, db = np.array(a), np.array(b)
    assert da.shape == db.shape
    for k, label in enumerate(labels):
        if label == "DANO":
            # a difference of two amplitudes: its error is that of F(+) and F(-), so
            # relative to the amplitudes, not to DANO (measured 1.1e-7 of F)
            scale = np.fmax(da[:, labels.index("F(+)")], da[:, labels.index("F(-)")])
            np.testing.assert_array_equal(np.isnan(db[:, k]), np.isnan(da[:, k]))
            ok = np.isfinite(da[:, k])
            assert np.all(np.abs(db[ok, k] - da[ok, k]) <= 2e-6 * scale[ok]), label
            continue
        # float32 in the file: I/g and sigma/g round to 2^-24 relative, twice; the cell is
        # read from the batch headers (float32) and French-Wilson's bins do not move with the
        # cell's last digits, so F, SIGF, F(+/-), SIGDANO too (measured <= 2.4e-7)
        np.testing.assert_allclose(db[:, k], da[:, k], rtol=2.5e-7 * 8, equal_nan=True,
                                   err_msg=label)
    assert np.isfinite(db[:, labels.index("F")]).sum() == len(db)  # amplitudes compared


def test_unmerged_mtz_cell_is_the_batch_cell_of_the_expt(merged_from_refl, tmp_path):
    """The header holds the cell to 4 decimals, the batch headers in float32: the reader
    takes the latter, which equals the .expt's cell to float32 rounding."""
    from dials_vmerge import geometry
    from dials_vmerge.io import read_experiments
    from dials_vmerge.mtz import read_unmerged_mtz

    work, _ = merged_from_refl
    expected = geometry.median_unit_cell(read_experiments(quartz_scaled()[0])).parameters()
    header = gemmi.read_mtz_file(str(work / "unmerged.mtz")).cell.parameters
    assert header[2] == pytest.approx(expected[2], abs=5e-5)
    assert abs(header[2] - expected[2]) > 1e-6  # the header alone is not precise enough
    read = read_unmerged_mtz(str(work / "unmerged.mtz")).unit_cell.parameters()
    np.testing.assert_allclose(read, expected, rtol=1.2e-7)
    # batches whose cells disagree with the header (another crystal, a wrong header): the
    # header's cell is used
    mtz = gemmi.read_mtz_file(str(work / "unmerged.mtz"))
    mtz.batches[3].cell = gemmi.UnitCell(5.0, 5.0, 5.5, 90, 90, 120)
    mtz.write_to_file(str(tmp_path / "other.mtz"))
    read = read_unmerged_mtz(str(tmp_path / "other.mtz")).unit_cell.parameters()
    np.testing.assert_allclose(read, header, rtol=1e-12)


def test_merge_program_refuses_a_merged_mtz(merged_from_refl, tmp_path, monkeypatch, capsys):
    from dials_vmerge.command_line.merge import main

    work, _ = merged_from_refl
    monkeypatch.chdir(tmp_path)
    assert main([str(work / "merged.mtz")]) == 1
    err = capsys.readouterr().err
    assert "not an unmerged MTZ" in err and "merged.mtz" in err
    assert not os.path.exists("merged.mtz")


def test_reciprocalspaceship_reads_both_files(merged_from_refl):
    import warnings

    rs = pytest.importorskip("reciprocalspaceship")
    work, ours = merged_from_refl
    with warnings.catch_warnings():
        # rs notes the HKL_base dataset's wavelength 0 beside ours (dials.export's layout too)
        warnings.simplefilter("ignore", UserWarning)
        unmerged = rs.read_mtz(str(work / "unmerged.mtz"))
        merged = rs.read_mtz(str(work / "merged.mtz"))
    assert unmerged.spacegroup.hm == merged.spacegroup.hm == "P 31 2 1"
    assert unmerged.cell.parameters == pytest.approx((4.9249, 4.9249, 5.4014, 90, 90, 120),
                                                     abs=2e-4)
    assert len(unmerged) == ours["overall"]["n_obs"] and len(merged) == ours["overall"]["n_uniq"]
    assert isinstance(unmerged["I"].dtype, rs.IntensityDtype)
    assert isinstance(unmerged["SIGI"].dtype, rs.StandardDeviationDtype)
    assert isinstance(unmerged["BATCH"].dtype, rs.BatchDtype)
    assert not unmerged["PARTIAL"].any()  # M of M/ISYM: partials are combined, as dials.export
    assert sorted(set(unmerged["BATCH"].to_numpy().astype(int))) == list(range(1, 101))
    assert isinstance(merged["IMEAN"].dtype, rs.IntensityDtype)
    assert isinstance(merged["I(+)"].dtype, rs.FriedelIntensityDtype)
    assert isinstance(merged["FreeR_flag"].dtype, rs.MTZIntDtype)
    assert merged["N"].to_numpy().sum() == ours["overall"]["n_obs"]


def test_show_summarises_mtz_files_and_an_expt_alone(merged_from_refl, capsys):
    from dials_vmerge.command_line.show import main

    work, ours = merged_from_refl
    assert main([str(work / "unmerged.mtz"), str(work / "merged.mtz")]) == 0
    out = capsys.readouterr().out
    assert "unmerged.mtz: unmerged MTZ" in out and "merged.mtz: merged MTZ" in out
    assert "space group: P 31 2 1 (number 152)" in out
    assert "batches: 100 (1-100)" in out
    assert f"Total: {ours['overall']['n_obs']} observations in 100 batches" in out
    assert f"Total: {ours['overall']['n_uniq']} reflections" in out
    assert "IMEAN" in out and "SCALEUSED" in out
    expt = quartz_scaled()[0]
    assert main([expt]) == 0
    out = capsys.readouterr().out
    assert "valid image ranges: 1-100" in out
    assert "Total: 1 experiment(s), 100 images (100 in valid ranges)" in out
    assert "reflections" not in out.split("Total:")[1]  # no table given: no counts made up
