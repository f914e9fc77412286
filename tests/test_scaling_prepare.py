"""Data preparation against the DIALS quartz files (dials-formats.md 6.3, dials-scaling.md 3)."""

import os

import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.io import read_reflections
from dials_vmerge.scaling import prepare
from dials_vmerge.table import ReflectionTable

from conftest import DATA

QUARTZ = os.path.join(DATA, "quartz_processed")


@pytest.fixture(scope="module")
def quartz():
    integrated = read_reflections(os.path.join(QUARTZ, "integrated.refl"))
    scaled = read_reflections(os.path.join(QUARTZ, "scaled.refl"))
    # the quartz run used the pre-3.30 partiality cut of 0.4
    prepared = prepare.prepare_dataset(integrated.copy(), intensity_choice="combine",
                                       partiality_cutoff=0.4, min_isigi=-5.0)
    return integrated, scaled, prepared


def test_partial_summation_removes_the_same_rows_as_dials(quartz):
    integrated, scaled, prepared = quartz
    assert integrated.nrows == 1653
    assert prepared.nrows == 1620
    assert np.array_equal(prepared["original_index"], scaled["original_index"])
    for name in ("partiality", "intensity.sum.value", "intensity.sum.variance",
                 "intensity.prf.value", "intensity.prf.variance"):
        # prf values are weighted means: summation order leaves a few ulps
        assert np.allclose(prepared[name], scaled[name], rtol=1e-14, atol=0), name
    # untouched columns of kept rows equal their original rows
    kept = scaled["original_index"].astype(np.int64)
    assert np.array_equal(prepared["miller_index"], integrated["miller_index"][kept])
    assert np.array_equal(prepared["xyzobs.px.value"], integrated["xyzobs.px.value"][kept])


def test_initial_filter_and_user_exclusions_flag_the_same_rows_as_dials(quartz):
    _, scaled, prepared = quartz
    user = prepared.get_flags(flags.user_excluded_in_scaling)
    excluded = prepared.get_flags(flags.excluded_for_scaling)
    assert user.sum() == 67
    assert (excluded & ~user).sum() == 41
    assert np.array_equal(user, scaled.get_flags(flags.user_excluded_in_scaling))
    assert np.array_equal(excluded, scaled.get_flags(flags.excluded_for_scaling))
    assert not prepared.get_flags(flags.outlier_in_scaling).any()
    assert not prepared.get_flags(flags.scaled).any()


def test_initial_intensities_equal_dials_intensity_scale_value(quartz):
    _, scaled, prepared = quartz
    assert np.allclose(prepared["intensity"], scaled["intensity.scale.value"], rtol=1e-15,
                       atol=0)
    # quartz has no qe column: the prescaling correction is lp itself
    assert np.array_equal(prepared["prescaling_correction"], prepared["lp"])


def test_clearing_flags_keeps_other_bits():
    t = ReflectionTable(3)
    t["flags"] = np.array([flags.bad_for_scaling | flags.scaled | flags.integrated_sum,
                           flags.outlier_in_scaling, flags.strong], dtype=np.uint64)
    prepare.clear_scaling_flags(t)
    assert t["flags"].tolist() == [flags.integrated_sum, 0, flags.strong]


def test_hand_built_partials_and_corrections():
    t = ReflectionTable(4, {0: "x"})
    t["id"] = np.zeros(4, np.int32)
    t["flags"] = np.full(4, flags.integrated_sum | flags.integrated_prf, np.uint64)
    t["partial_id"] = np.array([7, 3, 7, 9], np.uint64)
    t["partiality"] = np.array([0.3, 1.0, 0.5, 0.6])
    t["intensity.sum.value"] = np.array([30.0, 100.0, 50.0, 60.0])
    t["intensity.sum.variance"] = np.array([9.0, 100.0, 16.0, 25.0])
    t["intensity.prf.value"] = np.array([40.0, 90.0, 60.0, 55.0])
    t["intensity.prf.variance"] = np.array([16.0, 81.0, 36.0, 25.0])
    t["lp"] = np.array([0.5, 0.5, 0.5, 2.0])
    t["qe"] = np.array([0.8, 0.8, 0.8, -1.0])
    t["d"] = np.array([2.0, 3.0, 2.0, 1.0])
    out = prepare.prepare_dataset(t, intensity_choice="sum", partiality_cutoff=0.25)
    assert out.nrows == 3
    assert out["original_index"].tolist() == [0, 1, 3]
    assert out["partiality"][0] == pytest.approx(0.8)
    assert out["intensity.sum.value"][0] == 80.0
    assert out["intensity.sum.variance"][0] == 25.0
    # prf weights (I/sigma)^2: 1600/16 = 100 and 3600/36 = 100 -> mean 50, var (100*16+100*36)/200
    assert out["intensity.prf.value"][0] == pytest.approx(50.0)
    assert out["intensity.prf.variance"][0] == pytest.approx(26.0)
    # sum intensity * (lp/qe) / p ; qe <= 0 counts as 1
    assert out["intensity"][0] == pytest.approx(80.0 * 0.5 / 0.8 / 0.8)
    assert out["intensity"][2] == pytest.approx(60.0 * 2.0 / 0.6)
    # the row with qe <= 0 fails the initial filter
    assert out.get_flags(flags.excluded_for_scaling).tolist() == [False, False, True]
    # a d-range cut sets user_excluded_in_scaling
    t2 = out.copy()
    prepare.apply_user_exclusions(t2, d_min=1.5)
    assert t2.get_flags(flags.user_excluded_in_scaling).tolist() == [False, False, True]


def test_output_recipe_parity_with_dials(quartz):
    """Given DIALS's g, var(g) and error model, our output columns equal DIALS's."""
    import json

    from dials_vmerge.scaling.algorithm import prepare_output, scaled_variance
    from dials_vmerge.scaling.error_model import BasicErrorModel
    from dials_vmerge.scaling.prepare import suitable_selection

    _, scaled, prepared = quartz
    with open(os.path.join(QUARTZ, "scaled.expt")) as f:
        config = json.load(f)["scaling_model"][0]["configuration_parameters"]
    a, b = config["error_model_parameters"]
    model = BasicErrorModel(a, b)
    g = scaled["inverse_scale_factor"]
    var_g = scaled["inverse_scale_factor_variance"]
    variance = scaled_variance(prepared["intensity"], prepared["variance"], g, var_g, model)
    assert np.allclose(variance, scaled["intensity.scale.variance"], rtol=1e-12, atol=0)
    # and through prepare_output, with the rows DIALS scaled marked as our suitable rows
    table = prepared.copy()
    rows = np.flatnonzero(suitable_selection(table))
    outlier = scaled.get_flags(flags.outlier_in_scaling)[rows]
    out = prepare_output(table, rows, g[rows], var_g[rows], outlier, model)
    assert np.array_equal(out["intensity.scale.value"], prepared["intensity"])
    assert np.allclose(out["intensity.scale.value"], scaled["intensity.scale.value"],
                       rtol=1e-15, atol=0)
    assert np.allclose(out["intensity.scale.variance"], scaled["intensity.scale.variance"],
                       rtol=1e-12, atol=0)
    assert np.array_equal(out["inverse_scale_factor"], g)
    assert np.array_equal(out["flags"], scaled["flags"])
    assert sorted(out.keys()) == sorted(scaled.keys())
