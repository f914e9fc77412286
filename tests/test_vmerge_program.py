"""dials.vmerge end to end on the DIALS quartz integrated pair, compared with dials.scale's output
of the same sweep (issue 4 test 3), and the output files DIALS programs expect (section 11)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA
from quartz_helpers import merged_scaled_intensities
from dials_vmerge import flags, geometry
from dials_vmerge.io import read_experiments, read_reflections

QUARTZ = os.path.join(DATA, "quartz_processed")
# The settings of the DIALS run that wrote quartz scaled.refl (pre-3.30 defaults; see the
# version table at the top of dials-scaling.md).
DIALS_RUN_SETTINGS = [
    "partiality_cutoff=0.4",
    "reflection_selection.method=quasi_random",
    "Isigma_range=-5,0",
    "min_partiality=0.95",
    "deviation=dials",  # dials.scale's normalised deviations (ours default to unbiased)
]


def run_vmerge(args, cwd):
    code = "import sys; from dials_vmerge.command_line.vmerge import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quartz_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quartz")
    shutil.copy(os.path.join(QUARTZ, "integrated.expt"), work)
    shutil.copy(os.path.join(QUARTZ, "integrated.refl"), work)
    result = run_vmerge(["integrated.expt", "integrated.refl", *DIALS_RUN_SETTINGS], work)
    assert result.returncode == 0, result.stderr
    ours = read_reflections(str(work / "scaled.refl"))
    dials = read_reflections(os.path.join(QUARTZ, "scaled.refl"))
    return work, result, ours, dials


def test_outputs_written(quartz_run):
    work, result, _, _ = quartz_run
    for name in ("scaled.expt", "scaled.refl", "merged.mtz", "dials.vmerge.log", "dials.vmerge.json"):
        assert (work / name).exists(), name
    assert "Saved scaled reflections to scaled.refl" in result.stdout


def test_sigma_calibration_in_log_and_json(quartz_run):
    work, _, _, _ = quartz_run
    calibration = json.load(open(work / "dials.vmerge.json"))["merging"]["sigma_calibration"]
    assert calibration["n"] > 1000 and 0.5 < calibration["sd"] < 3.0
    assert len(calibration["by_intensity"]) == len(calibration["by_resolution"]) == 10
    assert len(calibration["normal_probability_plot"]) > 20
    log = (work / "dials.vmerge.log").read_text()
    assert f"overall: SD {calibration['sd']:.3f}" in log


def test_same_rows_columns_and_exclusions_as_dials(quartz_run):
    _, _, ours, dials = quartz_run
    assert ours.nrows == dials.nrows == 1620
    assert sorted(ours.keys()) == sorted(dials.keys())
    np.testing.assert_array_equal(ours["original_index"], dials["original_index"])
    for bit in (flags.user_excluded_in_scaling, flags.excluded_for_scaling):
        np.testing.assert_array_equal(ours.get_flags(bit), dials.get_flags(bit))
    assert np.array_equal(ours.get_flags(flags.scaled), ~ours.get_flags(flags.bad_for_scaling, all=False))


def test_scales_and_merged_intensities_agree_with_dials(quartz_run):
    work, _, ours, dials = quartz_run
    both = ours.get_flags(flags.scaled) & dials.get_flags(flags.scaled)
    r = np.corrcoef(ours["inverse_scale_factor"][both], dials["inverse_scale_factor"][both])[0, 1]
    assert r >= 0.99, f"Pearson r of g = {r:.5f}"
    sg = geometry.space_group(read_experiments(str(work / "scaled.expt"))[0])
    a, b = merged_scaled_intensities(ours, sg), merged_scaled_intensities(dials, sg)
    common = sorted(set(a) & set(b))
    r_merged = np.corrcoef([a[k] for k in common], [b[k] for k in common])[0, 1]
    assert r_merged >= 0.999, f"merged intensity r = {r_merged:.5f}"


def test_error_model_and_outliers_agree_with_dials(quartz_run):
    work, _, ours, dials = quartz_run
    ours_model = json.load(open(work / "scaled.expt"))["scaling_model"][0]
    dials_model = json.load(open(os.path.join(QUARTZ, "scaled.expt")))["scaling_model"][0]
    a_ours = ours_model["configuration_parameters"]["error_model_parameters"][0]
    a_dials = dials_model["configuration_parameters"]["error_model_parameters"][0]
    assert abs(a_ours / a_dials - 1) < 0.10, f"a = {a_ours:.4f} vs DIALS {a_dials:.4f}"
    o1 = ours.get_flags(flags.outlier_in_scaling)
    o2 = dials.get_flags(flags.outlier_in_scaling)
    jaccard = (o1 & o2).sum() / (o1 | o2).sum()
    assert jaccard >= 0.8, f"outlier Jaccard = {jaccard:.3f}"


def test_scaled_expt_in_dials_layout(quartz_run):
    work, _, _, _ = quartz_run
    ours = json.load(open(work / "scaled.expt"))
    dials = json.load(open(os.path.join(QUARTZ, "scaled.expt")))
    m1, m2 = ours["scaling_model"][0], dials["scaling_model"][0]
    assert list(m1) == list(m2)
    assert list(m1["configuration_parameters"]) == list(m2["configuration_parameters"])
    for name in ("scale", "decay", "absorption"):
        assert m1[name]["n_parameters"] == m2[name]["n_parameters"]
        assert list(m1[name]) == list(m2[name])
    assert m1["scale"]["est_standard_devs"][0] == 0.0  # fixed in the final full-matrix cycle
    scan = ours["scan"][0]
    assert scan["valid_image_ranges"] == {ours["experiment"][0]["identifier"]: [[1, 100]]}
    assert scan["batch_offset"] == 0
