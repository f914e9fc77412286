"""French-Wilson amplitudes as dials.merge computes them: the standardised-median <I>, the
DIALS acceptance rules, table interpolation and asymptotic forms, the flat-prior fallback;
against cctbx's own French-Wilson functions on the quartz merged data and hand-computed
cases."""

import math
import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (cctbx before scipy)
from cctbx import crystal, miller
from cctbx import french_wilson as cctbx_fw
from cctbx.array_family import flex

from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.merging.classical import merge_classical
from dials_vmerge.merging.french_wilson import french_wilson, mean_intensity_by_resolution
from dials_vmerge.merging.groups import flex_indices, group_observations

from quartz_helpers import quartz_scaled_observations

DATA = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")


@pytest.fixture(scope="module")
def quartz_merged():
    table, intensity, sigma, sg, uc = quartz_scaled_observations()
    out = {}
    for anomalous in (False, True):
        groups = group_observations(table["miller_index"], sg, anomalous, uc)
        out[anomalous] = (merge_classical(groups, intensity, sigma), sg, uc)
    return out


def _dials_expected_intensity_with_scipy(intensity, dstar_sq):
    """The DIALS recipe written with scipy's binned statistic and interp1d."""
    from scipy import interpolate, stats

    x = dstar_sq**1.5
    n = len(x)
    per_bin = max(n // 60, 20)
    n_bins = n // per_bin
    edges = np.interp(np.linspace(0, n, n_bins + 1), np.arange(n), np.sort(x))
    medians, edges, _ = stats.binned_statistic(
        x, intensity, statistic=lambda a: np.median(a) / math.log(2), bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    f = interpolate.interp1d(centres, medians, bounds_error=False,
                             fill_value=(medians[0], medians[-1]))
    return f(x)


@pytest.mark.parametrize("anomalous", [False, True])
def test_expected_intensity_equals_dials_recipe_on_quartz(quartz_merged, anomalous):
    merged, _, _ = quartz_merged[anomalous]
    ours = mean_intensity_by_resolution(merged.intensity, merged.dstar_sq)
    reference = _dials_expected_intensity_with_scipy(merged.intensity, merged.dstar_sq)
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(ours, reference, rtol=1e-12)


@pytest.mark.parametrize("anomalous", [False, True])
def test_expected_intensity_does_not_move_with_the_last_digits_of_the_cell(quartz_merged,
                                                                           anomalous):
    """Reflections of one resolution ((h,k,l) and (k,h,l) in P3121) tie exactly: the DIALS
    recipe on d* computed from the hexagonal invariants h^2+hk+k^2 and l^2 (equal
    resolutions get bit-identical d*) equals ours on cctbx's d*, for the .expt's cell and for
    that cell rounded to 4 decimals (an MTZ header's); and the two cells give one binning
    (before ties were merged, the rounding moved <I> of some reflections by 48%)."""
    from cctbx import uctbx

    merged, sg, uc = quartz_merged[anomalous]
    assert sg.crystal_system() == "Trigonal" and uc.parameters()[5] == pytest.approx(120)
    h, k, l = (merged.asu_index[:, j].astype(np.float64) for j in range(3))
    results = []
    for cell in (uc.parameters(), np.round(uc.parameters(), 4)):
        a, c = cell[0], cell[2]
        invariant_dstar_sq = 4.0 / (3.0 * a * a) * (h * h + h * k + k * k) + l * l / (c * c)
        cctbx_dstar_sq = uctbx.unit_cell(tuple(cell)).d_star_sq(
            flex_indices(merged.asu_index)).as_numpy_array()
        np.testing.assert_allclose(cctbx_dstar_sq, invariant_dstar_sq, rtol=1e-14)
        ours = mean_intensity_by_resolution(merged.intensity, cctbx_dstar_sq)
        reference = _dials_expected_intensity_with_scipy(merged.intensity, invariant_dstar_sq)
        np.testing.assert_allclose(ours, reference, rtol=1e-12)
        results.append(ours)
    # one binning: only the interpolation between bin centres sees the 1e-5 cell change
    np.testing.assert_allclose(results[1], results[0], rtol=2e-4)


@pytest.mark.parametrize("anomalous", [False, True])
def test_french_wilson_equals_cctbx_functions_on_quartz(quartz_merged, anomalous):
    merged, _, _ = quartz_merged[anomalous]
    assert len(merged) >= 200  # French-Wilson proper, not the flat-prior fallback
    J, sJ, F, sF = french_wilson(merged.intensity, merged.sigma, merged.centric,
                                 merged.dstar_sq)
    expected = mean_intensity_by_resolution(merged.intensity, merged.dstar_sq)
    regions = {"table": 0, "asymptotic": 0, "rejected": 0, "centric": 0}
    for i in range(len(merged)):
        function = cctbx_fw.fw_centric if merged.centric[i] else cctbx_fw.fw_acentric
        ref = function(float(merged.intensity[i]), float(merged.sigma[i]), float(expected[i]),
                       -4.0)
        if ref[0] < 0:  # cctbx's rejection marker
            assert np.isnan(F[i]) and np.isnan(J[i])
            regions["rejected"] += 1
            continue
        np.testing.assert_allclose([J[i], sJ[i], F[i], sF[i]], ref, rtol=1e-12)
        h_max = 4.0 if merged.centric[i] else 3.0
        h = merged.intensity[i] / merged.sigma[i]
        regions["table" if h < h_max + 0.5 else "asymptotic"] += 1
        regions["centric"] += int(merged.centric[i])
    # the comparison exercised both regimes and both reflection classes
    assert regions["table"] >= 5 and regions["asymptotic"] >= 100 and regions["centric"] >= 5


def test_hand_computed_expected_intensity():
    # 40 reflections at d*^3 = 1..40: two bins of 20 (edges 1, 21, 40; centres 11, 30.5);
    # standardised medians 10 and 20
    dstar_cubed = np.arange(1.0, 41.0)
    intensity = np.r_[np.full(20, 10 * math.log(2)), np.full(20, 20 * math.log(2))]
    intensity[[0, 5, 25]] = [-500.0, 1e6, 3e5]  # outliers do not move the medians
    expected = mean_intensity_by_resolution(intensity, dstar_cubed ** (2 / 3))
    assert expected[0] == pytest.approx(10.0, rel=1e-12)  # below the first centre
    assert expected[39] == pytest.approx(20.0, rel=1e-12)  # beyond the last centre
    assert expected[20] == pytest.approx(10 + 10 * (21 - 11) / (30.5 - 11), rel=1e-12)


def test_hand_computed_posteriors():
    intensity = np.array([0.0, 10.0, 10.0, -3.8, -3.6, 2.0])
    sigma = np.ones(6)
    centric = np.array([False, False, True, False, False, True])
    expected = np.array([1.0, 100.0, 50.0, 1.0, 2.0, 1.0])
    from dials_vmerge.merging.french_wilson import ACENTRIC_TABLE, CENTRIC_TABLE, french_wilson_kernel

    J, sJ, F, sF = french_wilson_kernel(intensity, sigma, expected, centric, ACENTRIC_TABLE,
                                        CENTRIC_TABLE)
    # h = 0 - 1/1 = -1: table row 30 of French & Wilson's acentric supplement
    assert J[0] == pytest.approx(0.525, abs=1e-12)
    assert F[0] == pytest.approx(cctbx_fw.ac_zf[30], abs=1e-12)
    # acentric, h = 10 - 0.01: normal approximation
    assert J[1] == pytest.approx(9.99) and sJ[1] == 1.0
    assert F[1] == pytest.approx(math.sqrt(9.99)) and sF[1] == pytest.approx(0.5 / math.sqrt(9.99))
    # centric, h = 10 - 1/100: the asymptotic series, here close to sqrt(h)
    h = 9.99
    assert F[2] == pytest.approx(math.sqrt(h) * (1 - 0.375 / h**2), rel=2e-4)
    assert J[2] == pytest.approx(h * (1 - 0.5 / h**2), rel=2e-4)
    # rejected: I/sigma = -3.8 < -3.7; h = -3.6 - 0.5 = -4.1 < -4
    assert np.isnan(F[3]) and np.isnan(J[3]) and np.isnan(F[4])
    # centric h = 2 - 1/2 = 1.5: table row 55 of the centric supplement
    assert J[5] == pytest.approx(cctbx_fw.c_zj[55], abs=1e-12)
    assert sF[5] == pytest.approx(cctbx_fw.c_zf_sd[55], abs=1e-12)


def test_flat_prior_below_200_reflections_equals_cctbx():
    rng = np.random.default_rng(3)
    n = 150
    sigma = rng.uniform(1, 5, n)
    intensity = rng.normal(5, 10, n)
    intensity[:3] = [-4.5 * sigma[0], -4.0 * sigma[1], -3.9 * sigma[2]]
    symmetry = crystal.symmetry(unit_cell=(50, 60, 70, 90, 90, 90), space_group_symbol="P 1")
    indices = np.c_[np.arange(1, n + 1), np.zeros(n), np.zeros(n)].astype(np.int32)
    array = miller.array(miller.set(symmetry, flex_indices(indices), anomalous_flag=False),
                         data=flex.double(intensity), sigmas=flex.double(sigma)
                         ).set_observation_type_xray_intensity()
    reference = array.enforce_positive_amplitudes()
    kept = np.isin(np.arange(1, n + 1), np.array(reference.indices())[:, 0])
    _, _, F, sF = french_wilson(intensity, sigma, np.zeros(n, bool), np.ones(n))
    assert not kept[0] and not kept[1] and kept[2]  # I/sigma must be > -4
    np.testing.assert_array_equal(np.isfinite(F), kept)
    np.testing.assert_allclose(F[kept], reference.data().as_numpy_array(), rtol=1e-12)
    np.testing.assert_allclose(sF[kept], reference.sigmas().as_numpy_array(), rtol=1e-12)


def test_merged_amplitudes_are_the_mean_of_friedel_amplitudes_as_dials_merge():
    """dials.merge (anomalous=True) runs French-Wilson on I(+)/I(-) and merges F(+), F(-)
    with cctbx merge_equivalents into F, SIGF."""
    from dials_vmerge.merging.api import merge_scaled_table

    table = read_reflections(os.path.join(DATA, "scaled.refl"))
    experiments = read_experiments(os.path.join(DATA, "scaled.expt"))
    result = merge_scaled_table(table, experiments, None)
    anom = result.merged_anomalous
    ok = np.isfinite(anom.amplitude)
    assert ok.all()
    symmetry = crystal.symmetry(unit_cell=result.unit_cell, space_group=result.space_group)
    amplitudes = miller.array(
        miller.set(symmetry, flex_indices(anom.asu_index[ok]), anomalous_flag=True),
        data=flex.double(anom.amplitude[ok]), sigmas=flex.double(anom.amplitude_sigma[ok]))
    reference = amplitudes.as_non_anomalous_array().merge_equivalents(
        use_internal_variance=False).array()
    np.testing.assert_array_equal(np.array(reference.indices()), result.merged.asu_index)
    np.testing.assert_allclose(result.merged.amplitude, reference.data().as_numpy_array(),
                               rtol=1e-12)
    np.testing.assert_allclose(result.merged.amplitude_sigma,
                               reference.sigmas().as_numpy_array(), rtol=1e-12)
