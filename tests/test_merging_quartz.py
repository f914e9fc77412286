"""Classical merging and merging statistics on the DIALS quartz scaled pair, against cctbx."""

import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (cctbx before scipy)
from cctbx import crystal, miller
from cctbx.array_family import flex
from iotbx import merging_statistics as iotbx_stats

from dials_vmerge import flags, geometry
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.merging.classical import merge_classical
from dials_vmerge.merging.groups import _flex_indices, group_observations
from dials_vmerge.merging.statistics import merging_statistics

DATA = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")


@pytest.fixture(scope="module")
def quartz():
    table = read_reflections(os.path.join(DATA, "scaled.refl"))
    experiments = read_experiments(os.path.join(DATA, "scaled.expt"))
    g = table["inverse_scale_factor"]
    keep = ~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0)
    table = table.select(keep)
    g = table["inverse_scale_factor"]
    intensity = table["intensity.scale.value"] / g
    sigma = np.sqrt(table["intensity.scale.variance"]) / g
    sg = geometry.space_group(experiments[0])
    uc = geometry.unit_cell(experiments[0])
    symmetry = crystal.symmetry(unit_cell=uc, space_group=sg)
    array = miller.array(
        miller.set(symmetry, _flex_indices(table["miller_index"]), anomalous_flag=False),
        data=flex.double(intensity),
        sigmas=flex.double(sigma),
    ).set_observation_type_xray_intensity()
    return table["miller_index"], intensity, sigma, sg, uc, array


@pytest.mark.parametrize("anomalous", [False, True])
def test_classical_equals_cctbx_merge_equivalents(quartz, anomalous):
    hkl, intensity, sigma, sg, uc, array = quartz
    groups = group_observations(hkl, sg, anomalous, uc)
    ours = merge_classical(groups, intensity, sigma)
    source = array.as_anomalous_array() if anomalous else array
    reference = source.merge_equivalents(use_internal_variance=False).array()
    ref_index = np.array(reference.indices(), dtype=np.int32)
    assert len(ref_index) == len(ours) > 250
    # cctbx sorts by packed index, which is our lexicographic group order
    np.testing.assert_array_equal(ref_index, ours.asu_index)
    np.testing.assert_allclose(ours.intensity, reference.data().as_numpy_array(), rtol=1e-9, atol=0)
    np.testing.assert_allclose(ours.sigma, reference.sigmas().as_numpy_array(), rtol=1e-9, atol=0)


STAT_FIELDS = [
    ("n_obs", "n_obs"), ("n_uniq", "n_uniq"), ("mean_redundancy", "multiplicity"),
    ("completeness", "completeness"), ("i_mean", "i_mean"),
    ("i_over_sigma_mean", "i_over_sigma_mean"), ("r_merge", "r_merge"), ("r_meas", "r_meas"),
    ("r_pim", "r_pim"), ("r_anom", "r_anom"), ("cc_one_half", "cc_half"),
    ("cc_one_half_n_refl", "cc_half_n_refl"),
    ("cc_one_half_significance", "cc_half_significance"), ("cc_anom", "cc_anom"),
    ("cc_anom_significance", "cc_anom_significance"), ("d_max", "d_max"), ("d_min", "d_min"),
]


def _compare(reference, ours, fields):
    for ref_name, our_name in fields:
        expected = getattr(reference, ref_name)
        got = getattr(ours, our_name)
        if expected is None or isinstance(expected, bool):
            assert got == expected, (ref_name, expected, got)
        else:
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (ref_name, expected, got)


@pytest.mark.parametrize("anomalous", [False, True])
def test_statistics_equal_iotbx(quartz, anomalous):
    hkl, intensity, sigma, sg, uc, array = quartz
    source = array.as_anomalous_array() if anomalous else array
    reference = iotbx_stats.dataset_statistics(
        source, n_bins=20, anomalous=anomalous, sigma_filtering=None,
        eliminate_sys_absent=False, use_internal_variance=False,
        cc_one_half_significance_level=0.01,
    )
    ours = merging_statistics(hkl, intensity, sigma, sg, uc, n_bins=20, anomalous=anomalous)
    fields = STAT_FIELDS + ([("anom_completeness", "anom_completeness")] if anomalous else [])
    _compare(reference.overall, ours.overall, fields)
    assert len(reference.bins) == len(ours.shells) == 20
    for ref_shell, our_shell in zip(reference.bins, ours.shells):
        _compare(ref_shell, our_shell, fields)
    assert ours.cc_half_overall == pytest.approx(reference.cc_one_half_overall, rel=1e-9)
    # The table rows are iotbx's format line for line.
    ref_rows = [b.format() for b in reference.bins] + [reference.overall.format()]
    assert ours.format_table().splitlines()[2:] == ref_rows


def test_statistics_json_and_summary(quartz):
    import json

    hkl, intensity, sigma, sg, uc, _ = quartz
    stats = merging_statistics(hkl, intensity, sigma, sg, uc, with_anomalous_table=True)
    text = json.dumps(stats.as_dict())
    assert '"cc_half"' in text
    summary = stats.format_summary()
    assert "Rmerge(I+/-)" in summary and "Total unique" in summary
    assert stats.d_min_cc_half_fit is not None and stats.d_min_cc_half_fit > 0.5
