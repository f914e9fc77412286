"""dials.vmerge.simulate: geometry, noise, Wilson statistics, determinism and the truth file.

Geometry is checked with the lead's independent helpers (dials_vmerge.geometry) and with the
formulas of dials-formats.md 3.1 written out here, the same checks the real DIALS files pass.
"""

import os

import h5py
import numpy as np
import pytest
from cctbx import miller, crystal as cctbx_crystal
from scipy.special import sph_harm_y

from dials_vmerge import geometry
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.simulate import read_truth, simulate_rotation, simulate_stills
from dials_vmerge.simulate.harmonics import real_harmonics
from dials_vmerge.simulate.smoothing import smooth_1d, smooth_layout

def _run_program(directory, *args):
    from dials_vmerge.command_line.simulate import main

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main(list(args))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def rotation_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rotation")
    code = _run_program(directory, "n_obs_target=30000", "seed=5", "n_sweeps=2",
                        "multiplicity=5", "absorption=on")
    assert code == 0
    return directory


@pytest.fixture(scope="module")
def rotation_data(rotation_files):
    d = rotation_files
    return (read_experiments(str(d / "simulated.expt")),
            read_reflections(str(d / "simulated.refl")),
            read_truth(str(d / "truth.h5")))


def test_program_writes_three_files_with_stable_truth_names(rotation_files, rotation_data):
    for name in ("simulated.expt", "simulated.refl", "truth.h5"):
        assert (rotation_files / name).stat().st_size > 0
    experiments, table, _ = rotation_data
    with h5py.File(rotation_files / "truth.h5", "r") as f:
        g = f["observations/inverse_scale_factor"][()]
        index = f["reflections/miller_index"][()]
        intensity = f["reflections/intensity"][()]
        assert f.attrs["seed"] == 5
        assert "scaling_model_json" in f["model/experiment_0"].attrs
    assert g.shape == (table.nrows,)
    assert index.shape == (len(intensity), 3)
    assert np.all(g > 0) and np.all(intensity >= 0)
    assert len(experiments) == 2
    assert set(table.identifiers.values()) == set(experiments.identifiers())
    for column in ("miller_index", "id", "d", "s1", "xyzobs.px.value", "xyzobs.px.variance",
                   "xyzobs.mm.value", "xyzcal.px", "xyzcal.mm", "intensity.prf.value",
                   "intensity.prf.variance", "intensity.sum.value", "intensity.sum.variance",
                   "flags", "lp", "qe", "partiality", "partial_id", "panel", "imageset_id",
                   "entering", "bbox", "zeta", "background.mean"):
        assert column in table, column
    assert table.get_flags(table.flags.integrated_sum).all()
    assert table.get_flags(table.flags.predicted | table.flags.indexed).all()


def test_rotation_geometry_matches_dials_conventions(rotation_data):
    experiments, table, _ = rotation_data
    for e, expt in enumerate(experiments):
        sel = table["id"] == e
        hkl = table["miller_index"][sel]
        cal = table["xyzcal.px"][sel]
        cal_mm = table["xyzcal.mm"][sel]
        s1 = table["s1"][sel]
        # phi from frame z equals xyzcal.mm z (radians); the same for the observed centroid
        phi = np.radians(geometry.rotation_angle_deg(expt, cal[:, 2]))
        assert np.abs(phi - cal_mm[:, 2]).max() < 1e-12
        obs = table["xyzobs.px.value"][sel]
        obs_mm = table["xyzobs.mm.value"][sel]
        assert np.abs(np.radians(geometry.rotation_angle_deg(expt, obs[:, 2])) - obs_mm[:, 2]).max() < 1e-12
        # d = 1/|A h|, and equals cctbx's d for the cell
        d = table["d"][sel]
        assert np.abs(geometry.d_spacing(expt, hkl) / d - 1).max() < 1e-12
        cell_d = np.array(geometry.unit_cell(expt).d(_flex_index(hkl)))
        assert np.abs(cell_d / d - 1).max() < 1e-9
        # s1 = s0 + R(phi) A h and |s1| = 1/lambda
        predicted = geometry.predicted_s1(expt, hkl, cal[:, 2])
        assert np.abs(predicted - s1).max() < 1e-12
        assert np.abs(np.linalg.norm(s1, axis=1) * geometry.wavelength(expt) - 1).max() < 1e-12
        # the spot lies where s1 meets the panel, in pixel units of the simple strategy
        panel = expt.detector["panels"][0]
        pixel = np.array(panel["pixel_size"])
        assert np.abs(cal_mm[:, :2] - cal[:, :2] * pixel).max() < 1e-9
        lab = (np.array(panel["origin"]) + cal_mm[:, :1] * np.array(panel["fast_axis"])
               + cal_mm[:, 1:2] * np.array(panel["slow_axis"]))
        cosine = np.sum(lab * s1, axis=1) / (np.linalg.norm(lab, axis=1) * np.linalg.norm(s1, axis=1))
        assert np.abs(cosine - 1).max() < 1e-12
        # frames: centroids inside the scan, bbox z brackets the observed z
        first, last = geometry.image_range(expt)
        assert obs[:, 2].min() >= 0 and obs[:, 2].max() < last - first + 1
        bbox = table["bbox"][sel]
        assert np.all((bbox[:, 4] <= obs[:, 2]) & (obs[:, 2] <= bbox[:, 5]))
        # lp = L/P and qe = 1 - exp(-mu t / |cos|) (dials-formats 3.1), zeta and entering
        s0 = geometry.s0(expt)
        m2 = geometry.lab_rotation_axis(expt)
        unit_s1 = s1 / np.linalg.norm(s1, axis=1)[:, None]
        unit_s0 = s0 / np.linalg.norm(s0)
        lorentz = np.abs(s1 @ np.cross(m2, s0)) / (np.linalg.norm(s0) * np.linalg.norm(s1, axis=1))
        f = expt.beam["polarization_fraction"]
        pn = np.array(expt.beam["polarization_normal"])
        pol = (1 - 2 * f) * (1 - (unit_s1 @ pn) ** 2) + f * (1 + (unit_s1 @ unit_s0) ** 2)
        assert np.abs(table["lp"][sel] / (lorentz / pol) - 1).max() < 1e-12
        normal = np.cross(panel["fast_axis"], panel["slow_axis"])
        qe = 1 - np.exp(-panel["mu"] * panel["thickness"] / np.abs(unit_s1 @ normal))
        assert np.abs(table["qe"][sel] / qe - 1).max() < 1e-12
        cross = np.cross(s1, s0)
        zeta = (cross @ m2) / np.linalg.norm(cross, axis=1)
        assert np.abs(table["zeta"][sel] - zeta).max() < 1e-12
        assert np.array_equal(table["entering"][sel], zeta < 0)


def _flex_index(hkl):
    from cctbx.array_family import flex

    return flex.miller_index([tuple(int(v) for v in row) for row in hkl])


def test_both_ewald_crossings_are_recorded(rotation_data):
    """A full turn would see each reflection twice; here both entering and exiting occur."""
    _, table, _ = rotation_data
    entering = table["entering"]
    assert 0.3 < entering.mean() < 0.7


def test_truth_indices_are_the_cctbx_asu_of_the_observed_indices(rotation_data):
    experiments, table, truth = rotation_data
    sg = geometry.space_group(experiments[0])
    cell = geometry.unit_cell(experiments[0])
    sym = cctbx_crystal.symmetry(unit_cell=cell, space_group=sg)
    mset = miller.set(sym, _flex_index(table["miller_index"]), anomalous_flag=False).map_to_asu()
    asu = np.array(mset.indices()).reshape(-1, 3)
    truth_index = truth["reflections/miller_index"][truth["observations/unique_index"]]
    assert np.array_equal(asu, truth_index)


def test_partials_share_partial_id_and_split_the_profile(rotation_data):
    _, table, _ = rotation_data
    pid = table["partial_id"]
    values, counts = np.unique(pid, return_counts=True)
    assert counts.max() == 2
    split = values[counts == 2]
    assert 0.005 < len(split) / len(values) < 0.2
    rows = np.flatnonzero(np.isin(pid, split))
    rows = rows[np.argsort(pid[rows], kind="stable")]
    first, second = rows[0::2], rows[1::2]
    assert np.array_equal(table["miller_index"][first], table["miller_index"][second])
    assert np.array_equal(table["bbox"][first][:, 5], table["bbox"][second][:, 4])
    total = table["partiality"][first] + table["partiality"][second]
    assert np.all(total <= 1 + 1e-12)
    assert np.all(table["partiality"][first] < 0.99) and np.all(table["partiality"][second] < 0.99)


def _corrected(table, kind):
    c = table["lp"] / table["qe"]
    if kind == "sum":
        c = c / table["partiality"]
    return table[f"intensity.{kind}.value"] * c, table[f"intensity.{kind}.variance"] * c * c


def test_residuals_against_truth_have_reduced_chi_square_one(rotation_data):
    _, table, truth = rotation_data
    expected = truth["observations/inverse_scale_factor"] * truth["observations/true_intensity"]
    prf_ok = table.get_flags(table.flags.integrated_prf)
    for kind in ("prf", "sum"):
        value, variance = _corrected(table, kind)
        sel = prf_ok if kind == "prf" else np.ones(table.nrows, bool)
        chi2 = np.mean((value[sel] - expected[sel]) ** 2 / variance[sel])
        assert 0.9 < chi2 < 1.1, (kind, chi2)
        # and no bias: the mean standardised residual is near zero
        z = (value[sel] - expected[sel]) / np.sqrt(variance[sel])
        assert abs(z.mean()) < 0.05, (kind, z.mean())


def test_mean_i_over_sigma_reaches_target_and_falls_with_resolution():
    _, table, _ = simulate_rotation(n_obs_target=20000, seed=3, mean_i_over_sigma=5.0)
    ok = table.get_flags(table.flags.integrated_prf)
    i_over_sigma = table["intensity.prf.value"][ok] / np.sqrt(table["intensity.prf.variance"][ok])
    assert 4.5 < i_over_sigma.mean() < 5.5
    d = table["d"][ok]
    low, high = d > np.quantile(d, 0.8), d < np.quantile(d, 0.2)
    assert i_over_sigma[low].mean() > 3 * i_over_sigma[high].mean()


def test_outliers_and_error_model_inflation():
    _, table, truth = simulate_rotation(n_obs_target=20000, seed=4, outlier_fraction=0.05,
                                        error_model_a=2.0, error_model_b=0.0)
    expected = truth.inverse_scale_factor * truth.true_intensity
    value, variance = _corrected(table, "sum")
    z2 = (value - expected) ** 2 / variance
    clean = ~truth.is_outlier
    assert 0.035 < truth.is_outlier.mean() < 0.065
    # a = 2 inflates the true variance four-fold over the reported one
    assert 3.5 < z2[clean].mean() < 4.5
    assert np.median(z2[truth.is_outlier]) > 4 * 16 / 2


def test_wilson_statistics_of_true_intensities(rotation_data):
    _, _, truth = rotation_data
    j = truth["reflections/intensity"]
    d = truth["reflections/d"]
    eps = truth["reflections/epsilon"]
    centric = truth["reflections/centric"].astype(bool)
    import json

    wilson_b = json.loads(truth["settings_json"])["wilson_b"]
    e2 = j / (eps * np.exp(-wilson_b / (2 * d * d)))
    for mask, expected, tolerance in ((~centric, 2.0, 0.12), (centric, 3.0, 0.45)):
        ratio = np.mean(e2[mask] ** 2) / np.mean(e2[mask]) ** 2
        assert abs(ratio - expected) < tolerance, (expected, ratio, mask.sum())
    assert centric.sum() > 300


def test_anomalous_signal_sets_bijvoet_differences():
    _, table, truth = simulate_rotation(n_obs_target=10000, seed=6, anomalous=True,
                                        bijvoet_ratio=0.1)
    s = truth.structure
    acentric = ~s.centric
    relative = (s.intensity_plus - s.intensity_minus)[acentric] / (2 * s.mean_intensity[acentric])
    assert 0.08 < relative.std() < 0.12
    assert np.array_equal(s.intensity_plus[s.centric], s.intensity_minus[s.centric])
    # both hands are observed, and the hand follows the Friedel sign
    assert 0.3 < truth.hand.mean() < 0.7


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    args = ("n_obs_target=3000", "n_sweeps=2", "anomalous=True")
    outputs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        directory = tmp_path / name
        directory.mkdir()
        assert _run_program(directory, *args, f"seed={seed}") == 0
        outputs[name] = {f: (directory / f).read_bytes()
                         for f in ("simulated.expt", "simulated.refl", "truth.h5")}
    for f in outputs["a"]:
        assert outputs["a"][f] == outputs["b"][f], f
        assert outputs["a"][f] != outputs["c"][f], f


def test_stills_have_no_scan_and_per_image_kb_truth():
    experiments, table, truth = simulate_stills(n_stills=12, seed=2)
    assert experiments["scan"] == [] and experiments["goniometer"] == []
    assert all("scan" not in e and "goniometer" not in e for e in experiments["experiment"])
    assert np.all(table["xyzobs.px.value"][:, 2] == 0.5)
    assert np.all(table["xyzcal.px"][:, 2] == 0.0)
    assert not table["entering"].any()
    assert np.all(table["lp"] > 0)
    from dials_vmerge.io.expt import ExperimentList

    elist = ExperimentList.from_dict(experiments)
    for e, expt in enumerate(elist):
        sel = table["id"] == e
        hkl = table["miller_index"][sel]
        s2 = geometry.s0(expt) + hkl @ geometry.A_matrix(expt).T
        s1 = table["s1"][sel]
        unit = s2 / np.linalg.norm(s2, axis=1)[:, None]
        assert np.abs(unit - s1 * geometry.wavelength(expt)).max() < 1e-12
        model = truth.models[e]
        assert model.kind == "KB"
        g = model.parameters["scale"][0] * np.exp(model.parameters["decay"][0] / (2 * table["d"][sel] ** 2))
        assert np.allclose(truth.inverse_scale_factor[sel], g, rtol=1e-12)
    scales = [m.parameters["scale"][0] for m in truth.models]
    assert np.std(np.log(scales)) > 0.05
    assert np.all((table["partiality"] >= 0.1) & (table["partiality"] <= 1))


def test_real_harmonics_follow_the_dials_convention():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    lmax = 6
    ours = real_harmonics(v, lmax)
    theta = np.arctan2(np.hypot(v[:, 0], v[:, 1]), v[:, 2])
    phi = np.mod(np.arctan2(v[:, 1], v[:, 0]), 2 * np.pi)
    k = 0
    for l in range(1, lmax + 1):
        for m in range(-l, l + 1):
            y = sph_harm_y(l, abs(m), theta, phi)
            if m < 0:
                ref = np.sqrt(2) * (-1) ** m * y.imag
            elif m == 0:
                ref = y.real
            else:
                ref = np.sqrt(2) * (-1) ** m * y.real
            assert np.allclose(ours[:, k], ref, atol=1e-12), (l, m)
            k += 1


def test_smoother_matches_hand_computed_dials_weights():
    params = np.array([1.0, 2.0, 4.0, 3.0, 0.5])
    x = np.array([1.2, 0.0, 2.9])
    # N = 5 >= 4: positions i - 0.5, sigma 0.7, three neighbours from i1 = iround(x - 1.5) + 1;
    # at x = 0, iround(-1.5) = -2 gives i1 = -1, i2 = 2, clamped to i1 = 0, i2 = max(2, 2).
    windows = {1.2: [1, 2, 3], 0.0: [0, 1], 2.9: [2, 3, 4]}
    expected = []
    for xi in x:
        idx = np.array(windows[xi])
        w = np.exp(-(((xi - (idx - 0.5)) / 0.7) ** 2))
        expected.append(np.sum(w * params[idx]) / np.sum(w))
    assert np.allclose(smooth_1d(x, params), expected, rtol=1e-14)
    # DIALS layouts: quartz 100 deg at 1 deg/image -> scale 9 params, s_norm_fac 0.06993
    assert smooth_layout(100.0, 1.0, 15.0)[:2] == (9, pytest.approx(0.06993))
    assert smooth_layout(100.0, 1.0, 20.0)[0] == 7


def test_physical_truth_model_json_reproduces_truth_g(rotation_data):
    """The stored DIALS-layout model, evaluated from its JSON alone, gives the true g."""
    experiments, table, truth = rotation_data
    from dials_vmerge.simulate.harmonics import absorption_surface

    for e, model in enumerate(truth["scaling_models"]):
        expt = experiments[e]
        sel = table["id"] == e
        config = model["configuration_parameters"]
        z = table["xyzobs.px.value"][sel][:, 2]
        d = table["d"][sel]
        g = smooth_1d(z * config["s_norm_fac"], np.array(model["scale"]["parameters"]))
        b = smooth_1d(z * config["d_norm_fac"], np.array(model["decay"]["parameters"]))
        g = g * np.exp(b / (2 * d * d))
        assert "absorption" in config["corrections"]
        phi = np.radians(geometry.rotation_angle_deg(expt, z))
        g = g * absorption_surface(
            phi, np.ascontiguousarray(table["s1"][sel]), geometry.sample_to_source(expt),
            geometry.setting_rotation(expt), geometry.rotation_axis(expt),
            geometry.fixed_rotation(expt), np.array(model["absorption"]["parameters"]),
            config["lmax"])
        assert np.allclose(truth["observations/inverse_scale_factor"][sel], g, rtol=1e-12)
        assert len(model["scale"]["parameters"]) >= 2
        # dose-like decay: B at the end of the sweep is lower than at the start
        assert model["decay"]["parameters"][-1] < model["decay"]["parameters"][0]


def test_array_and_kb_truth_models_run():
    _, table, truth = simulate_rotation(n_obs_target=5000, seed=8, model="array")
    assert truth.models[0].kind == "array"
    assert np.all(truth.inverse_scale_factor > 0)
    assert truth.models[0].scaling_model_dict()["configuration_parameters"]["n_res_param"] == 12
    _, table, truth = simulate_rotation(n_obs_target=5000, seed=8, model="KB")
    for e, model in enumerate(truth.models):
        sel = table["id"] == e
        g = model.parameters["scale"][0] * np.exp(model.parameters["decay"][0] / (2 * table["d"][sel] ** 2))
        assert np.allclose(truth.inverse_scale_factor[sel], g, rtol=1e-12)
