"""Classical merging and merging statistics on the DIALS quartz scaled pair, against cctbx."""

import math

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (cctbx before scipy)
from cctbx import crystal, miller
from cctbx.array_family import flex
from iotbx import merging_statistics as iotbx_stats

from dials_vmerge.merging.classical import merge_classical
from dials_vmerge.merging.groups import flex_indices, group_observations
from dials_vmerge.merging.statistics import merging_statistics

from quartz_helpers import quartz_scaled_observations


@pytest.fixture(scope="module")
def quartz():
    table, intensity, sigma, sg, uc = quartz_scaled_observations()
    symmetry = crystal.symmetry(unit_cell=uc, space_group=sg)
    array = miller.array(
        miller.set(symmetry, flex_indices(table["miller_index"]), anomalous_flag=False),
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
    fields = STAT_FIELDS + ([("anom_completeness", "anom_completeness"),
                             ("anom_signal", "anom_signal"),
                             ("delta_i_mean_over_sig_delta_i_mean",
                              "delta_i_mean_over_sig_delta_i_mean")] if anomalous else [])
    _compare(reference.overall, ours.overall, fields)
    assert len(reference.bins) == len(ours.shells) == 20
    for ref_shell, our_shell in zip(reference.bins, ours.shells):
        _compare(ref_shell, our_shell, fields)
    assert ours.cc_half_overall == pytest.approx(reference.cc_one_half_overall, rel=1e-9)
    if anomalous:  # the anomalous normal probability plot, overall only (as iotbx)
        for ref_plot, slope in ((reference.overall.anom_probability_plot_expected_delta,
                                 ours.overall.anom_probability_slope),
                                (reference.overall.anom_probability_plot_all_data,
                                 ours.overall.anom_probability_slope_all_data)):
            assert ref_plot.slope is not None
            assert slope == pytest.approx(ref_plot.slope, rel=1e-9)
        plot = reference.overall.anom_probability_plot_expected_delta
        assert ours.overall.anom_probability_intercept == pytest.approx(plot.intercept,
                                                                        rel=1e-9, abs=1e-12)
        assert ours.overall.anom_probability_n_pairs == plot.n_pairs > 50
    # The table rows are iotbx's format line for line, except that an undefined value reads
    # n/a in its column where iotbx prints 0.000 (CC) or leaves a gap that shifts the rest
    # (r_anom) (issue 15).
    ref_bins = list(reference.bins) + [reference.overall]
    rows = ours.format_table().splitlines()[2:]
    assert len(rows) == len(ref_bins)
    n_undefined = 0
    for row, ref_bin, our_shell in zip(rows, ref_bins, ours.shells + [ours.overall]):
        if ref_bin.r_anom is not None and our_shell.cc_anom_n_pairs >= 2 and \
                our_shell.cc_half_n_refl >= 2:
            assert row == ref_bin.format()
        else:
            n_undefined += 1
            assert "n/a" in row and len(row.split()) == 14  # every column still there
    assert n_undefined < len(rows) // 2


DIALS_SUMMARY_ROWS = {  # dials.report.analysis.table_1_stats: row -> iotbx attribute
    "I/sigma": "i_over_sigma_mean", "Completeness": "completeness",
    "Low resolution limit": "d_max", "Multiplicity": "mean_redundancy",
    "Rmerge(I)": "r_merge", "Rmeas(I)": "r_meas", "High resolution limit": "d_min",
    "Total observations": "n_obs", "Rpim(I)": "r_pim", "CC half": "cc_one_half",
    "Total unique": "n_uniq",
}
DIALS_ANOMALOUS_ROWS = {
    "Rmerge(I+/-)": "r_merge", "Rpim(I+/-)": "r_pim", "Rmeas(I+/-)": "r_meas",
    "Anomalous completeness": "anom_completeness", "Anomalous correlation": "anom_half_corr",
    "Anomalous multiplicity": "mean_redundancy",
}


def iotbx_pair(array, **kw):
    """dials.scale's two iotbx statistics objects (non-anomalous and anomalous)."""
    options = dict(n_bins=20, sigma_filtering=None, eliminate_sys_absent=False,
                   use_internal_variance=False, cc_one_half_significance_level=0.01)
    options.update(kw)
    normal = iotbx_stats.dataset_statistics(array, anomalous=False, **options)
    anomalous = iotbx_stats.dataset_statistics(
        array.as_anomalous_array().map_to_asu(), anomalous=True, **options)
    return normal, anomalous


def dials_summary_from_iotbx(full, full_anom, cut=None, cut_anom=None):
    """The summary table values as dials.scale builds them from iotbx objects."""
    rows = {}

    def columns(r, c, attribute):
        if cut is not None:
            return [getattr(c.overall, attribute), getattr(c.bins[0], attribute),
                    getattr(c.bins[-1], attribute), getattr(r.overall, attribute)]
        return [getattr(r.overall, attribute), getattr(r.bins[0], attribute),
                getattr(r.bins[-1], attribute)]

    for table, r, c in ((DIALS_SUMMARY_ROWS, full, cut),
                        (DIALS_ANOMALOUS_ROWS, full_anom, cut_anom)):
        for label, attribute in table.items():
            values = columns(r, c, attribute)
            if "completeness" in attribute:
                values = [100 * v if v else None for v in values]
            rows[label] = values
    source = cut_anom if cut is not None else full_anom
    rows["Anomalous slope"] = [source.overall.anom_probability_plot_expected_delta.slope]
    rows["dF/F"] = [source.overall.anom_signal]
    rows["dI/s(dI)"] = [source.overall.delta_i_mean_over_sig_delta_i_mean]
    return rows


def _compare_summary(ours, reference):
    assert set(ours) == set(reference)
    for label, values in reference.items():
        assert len(ours[label]) == len(values), label
        for got, expected in zip(ours[label], values):
            if expected is None:
                assert got is None, label
            else:
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (label, got, expected)


def test_summary_table_equals_iotbx_on_quartz(quartz):
    hkl, intensity, sigma, sg, uc, array = quartz
    ours = merging_statistics(hkl, intensity, sigma, sg, uc, with_anomalous_table=True)
    assert ours.cut_statistics is None  # quartz: CC1/2 stays above 0.3 in significant shells
    full, full_anom = iotbx_pair(array)
    _compare_summary(ours.summary_values(), dials_summary_from_iotbx(full, full_anom))
    text = ours.format_summary()
    assert text.splitlines()[2].endswith(" Overall    Low     High")
    assert "Anomalous slope                             " in text
    row = [line for line in text.splitlines() if line.startswith("dF/F")][0]
    assert row == "dF/F".ljust(44) + "%7.3f" % full_anom.overall.anom_signal + " " * 16


def test_centric_space_group_has_no_anomalous_rows():
    from merging_simulation import simulate

    sim = simulate(seed=2, symbol="P -1", cell=(30, 40, 50, 80, 85, 95), d_min=3.0)
    stats = merging_statistics(sim.miller_index, sim.intensity, sim.sigma, sim.space_group,
                               sim.unit_cell, with_anomalous_table=not sim.space_group.is_centric())
    text = stats.format_summary()
    assert "CC half" in text and "Total unique" in text
    for label in ("Rmerge(I+/-)", "Anomalous", "dF/F", "dI/s(dI)"):
        assert label not in text


def test_suggested_column_on_data_cut_at_the_cc_half_fit():
    """Weak simulated data whose CC1/2 falls below 0.3 inside the data: the summary has
    Suggested/Low/High from the statistics of the data cut at the fitted limit, Overall from
    all data; all equal to iotbx on the same (cut) arrays."""
    from merging_simulation import simulate
    from scitbx.math import curve_fitting, five_number_summary

    sim = simulate(seed=5, scale=40.0, wilson_b=40.0, background=300.0, d_min=1.8,
                   mean_multiplicity=4.0)
    ours = merging_statistics(sim.miller_index, sim.intensity, sim.sigma, sim.space_group,
                              sim.unit_cell, with_anomalous_table=True)
    symmetry = crystal.symmetry(unit_cell=sim.unit_cell, space_group=sim.space_group)
    array = miller.array(
        miller.set(symmetry, flex_indices(sim.miller_index), anomalous_flag=False),
        data=flex.double(sim.intensity), sigmas=flex.double(sim.sigma),
    ).set_observation_type_xray_intensity()
    full, full_anom = iotbx_pair(array)
    # dials' resolution_cc_half on iotbx's shells: significant shells with CC1/2 > 0, tanh fit
    # (IQR multiplier 6), first crossing of 0.3 from high resolution
    bins = full.bins[::-1]
    sel = [b.cc_one_half_significance and b.cc_one_half > 0 for b in bins]
    x = flex.double([1 / b.d_min**2 for b, s in zip(bins, sel) if s])
    y = flex.double([b.cc_one_half for b, s in zip(bins, sel) if s])
    assert flex.min(y) < 0.3
    f = curve_fitting.tanh(*curve_fitting.tanh_fit(x, y).params)
    dy = y - f(x)
    _, q1, _, q3, _ = five_number_summary(dy)
    outliers = (dy > q3 + 6 * (q3 - q1)) | (dy < q1 - 6 * (q3 - q1))
    if outliers.count(True):
        f = curve_fitting.tanh(*curve_fitting.tanh_fit(x.select(~outliers),
                                                       y.select(~outliers)).params)
    fit = f(x)
    crossing = next(x[j - 1] + (0.3 - fit[j - 1]) * (x[j] - x[j - 1]) / (fit[j] - fit[j - 1])
                    for j in range(1, len(x)) if (fit[j - 1] - 0.3) * (fit[j] - 0.3) < 0)
    d_fit = 1 / math.sqrt(crossing)
    assert ours.d_min_cc_half_fit == pytest.approx(d_fit, rel=1e-9)
    assert d_fit > full.bins[-1].d_min + 0.05  # a cut well inside the data
    assert ours.cut_statistics is not None
    cut_array = array.resolution_filter(d_min=d_fit)
    cut, cut_anom = iotbx_pair(cut_array)
    reference = dials_summary_from_iotbx(full, full_anom, cut, cut_anom)
    _compare_summary(ours.summary_values(), reference)
    assert ours.summary_values()["High resolution limit"][0] == pytest.approx(
        cut.overall.d_min) and cut.overall.d_min >= d_fit
    text = ours.format_summary()
    assert text.splitlines()[2].endswith("Suggested   Low    High  Overall")


def test_statistics_json_and_summary(quartz):
    import json

    hkl, intensity, sigma, sg, uc, _ = quartz
    stats = merging_statistics(hkl, intensity, sigma, sg, uc, with_anomalous_table=True)
    text = json.dumps(stats.as_dict())
    assert '"cc_half"' in text
    summary = stats.format_summary()
    assert "Rmerge(I+/-)" in summary and "Total unique" in summary
    assert stats.d_min_cc_half_fit is not None and stats.d_min_cc_half_fit > 0.5
