"""Statistics of merging.method=robust|variational describe that method's merged intensities
(issue 13), and the per-batch statistics kernel against a plain second implementation."""

import numpy as np
import pytest

from merging_simulation import simulate
from dials_vmerge.merging.api import MethodMerger, merge_groups
from dials_vmerge.merging.batch_statistics import batch_bins, batch_sums_kernel, _values
from dials_vmerge.merging.groups import Groupings
from dials_vmerge.merging.statistics import merging_statistics


@pytest.fixture(scope="module")
def sim():
    return simulate(seed=5, outlier_fraction=0.02, d_min=2.5, n_batches=60)


def _merged(sim, method):
    groupings = Groupings(sim.miller_index, sim.space_group, sim.unit_cell)
    merged = [merge_groups(method, groupings.get(anomalous), sim.intensity, sim.sigma,
                           french_wilson_amplitudes=False) for anomalous in (False, True)]
    return groupings, merged


def _statistics(sim, groupings, merger):
    return merging_statistics(sim.miller_index, sim.intensity, sim.sigma, sim.space_group,
                              sim.unit_cell, n_bins=10, with_anomalous_table=True,
                              groupings=groupings, merger=merger)


def test_a_classical_merger_reproduces_the_inverse_variance_statistics(sim):
    """The merger path draws the same random halves as cctbx's split (its own kernel): with
    the inverse-variance merge as the 'method', CC1/2 and every mean-based value is the
    default path's."""
    groupings, merged = _merged(sim, "classical")
    reference = _statistics(sim, groupings, None)
    ours = _statistics(sim, groupings, MethodMerger("classical", None, merged))
    assert ours.method == "classical"
    for a, b in zip([ours.overall, *ours.shells], [reference.overall, *reference.shells]):
        for key in ("n_obs", "n_uniq", "i_mean", "i_over_sigma_mean", "r_merge", "r_meas",
                    "r_pim", "cc_half", "cc_half_n_refl", "completeness"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("method", ["robust", "variational"])
def test_statistics_describe_the_methods_merged_intensities(sim, method):
    groupings, merged = _merged(sim, method)
    ours = _statistics(sim, groupings, MethodMerger(method, None, merged))
    classical = _statistics(sim, groupings, None)
    assert ours.method == method and ours.as_dict()["method"] == method
    # independent recomputation of the overall values from the method's merged intensities
    m = merged[0]
    groups = groupings.get(False)
    assert np.array_equal(m.asu_index, groups.asu_index)
    assert ours.overall.i_mean == pytest.approx(m.intensity.mean(), rel=1e-12)
    assert ours.overall.i_over_sigma_mean == pytest.approx((m.intensity / m.sigma).mean(),
                                                           rel=1e-12)
    group_of = groups.group_of_original()
    multi = m.n_obs[group_of] > 1
    deviation = np.abs(sim.intensity - m.intensity[group_of])[multi].sum()
    assert ours.overall.r_merge == pytest.approx(deviation / sim.intensity[multi].sum(),
                                                 rel=1e-12)
    # not classical's (on these strong data the variational posterior moves <I/sigma> only
    # by ~1e-4 relative, so the check is only that it moved)
    assert ours.overall.i_over_sigma_mean != pytest.approx(classical.overall.i_over_sigma_mean,
                                                           rel=1e-6)
    assert ours.overall.cc_half != classical.overall.cc_half
    if method == "robust":
        # 2% gross outliers: the robust halves agree better than the inverse-variance ones
        assert ours.overall.cc_half > classical.overall.cc_half


def _per_batch_reference(intensity, sigma, scale, batch, group_of, merged_mean, n_batches):
    """Per-batch sums by plain loops over observations (a second implementation)."""
    n_groups = group_of.max() + 1
    members = [np.flatnonzero(group_of == g) for g in range(n_groups)]
    out = {k: np.zeros(n_batches) for k in ("n", "scale", "isig", "rnum", "rden")}
    pairs = [[] for _ in range(n_batches)]
    for g, rows in enumerate(members):
        w = 1.0 / sigma[rows] ** 2
        for j, row in enumerate(rows):
            b = batch[row]
            out["n"][b] += 1
            out["scale"][b] += scale[row]
            out["isig"][b] += intensity[row] / sigma[row]
            if len(rows) > 1:
                out["rnum"][b] += abs(intensity[row] - merged_mean[g])
                out["rden"][b] += intensity[row]
                others = np.delete(np.arange(len(rows)), j)
                rest = (w[others] * intensity[rows[others]]).sum() / w[others].sum()
                pairs[b].append((intensity[row], rest))
    cc = [np.corrcoef(np.array(p).T)[0, 1] if len(p) > 2 else np.nan for p in pairs]
    return out, np.array(cc)


def test_batch_sums_kernel_against_plain_loops(sim):
    groupings = Groupings(sim.miller_index, sim.space_group, sim.unit_cell)
    groups = groupings.get(False)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, len(sim.intensity))
    batch = sim.batch - 1
    merged = merge_groups("robust", groups, sim.intensity, sim.sigma,
                          french_wilson_amplitudes=False)
    n_batches = int(batch.max()) + 1
    sums = batch_sums_kernel(groups.permutation, groups.group_start, sim.intensity, sim.sigma,
                             scale, batch.astype(np.int64), merged.intensity,
                             np.ones(groups.n_groups, bool), n_batches)
    values = _values(sums, np.cumsum(sums[:, -1]), groups.n_groups)
    ref, ref_cc = _per_batch_reference(sim.intensity, sim.sigma, scale, batch,
                                       groups.group_of_original(), merged.intensity, n_batches)
    np.testing.assert_array_equal(values["n_obs"], ref["n"])
    np.testing.assert_allclose(values["mean_scale"], ref["scale"] / ref["n"], rtol=1e-12)
    np.testing.assert_allclose(values["i_over_sigma"], ref["isig"] / ref["n"], rtol=1e-12)
    np.testing.assert_allclose(values["r_merge"], ref["rnum"] / ref["rden"], rtol=1e-12)
    np.testing.assert_allclose(values["cc_rest"], ref_cc, rtol=1e-9)
    # cumulative completeness: every group counted once, at its earliest batch
    first = np.full(groups.n_groups, n_batches)
    np.minimum.at(first, groups.group_of_original(), batch)
    expected = np.cumsum(np.bincount(first, minlength=n_batches)) / groups.n_groups
    np.testing.assert_allclose(values["completeness"], expected, rtol=1e-15)


def test_batch_bins_keep_datasets_apart_and_group_stills():
    # two sweeps of 100 batches, then 30 stills (one batch each)
    batches = np.concatenate([np.arange(1, 101), np.arange(101, 201), 300 + np.arange(30)])
    dataset = np.concatenate([np.zeros(100, int), np.ones(100, int), 2 + np.arange(30)])
    single = dataset >= 2
    bins = batch_bins(batches, dataset, single, max_rows=50)
    width = max(b - a for a, b in bins)
    assert width == 5  # ceil(230 / 50)
    assert sum(b - a for a, b in bins) == len(batches)
    for a, b in bins:  # no bin mixes a sweep with anything else
        kinds = set(dataset[a:b]) if not single[a] else {"stills"}
        assert len(kinds) == 1 and (single[a:b].all() or not single[a:b].any())
    assert len(bins) == 20 + 20 + 6


def test_merge_program_labels_and_reports_the_methods_statistics(tmp_path):
    import json
    import os

    from conftest import DATA
    from test_report import run_program

    quartz = os.path.join(DATA, "quartz_processed")
    run_program("merge", [os.path.join(quartz, "scaled.expt"), os.path.join(quartz, "scaled.refl"),
                          "merging.method=robust", "output.html=None"], tmp_path)
    report = json.load(open(tmp_path / "dials.vmerge.merge.json"))
    stats = report["merging_statistics"]
    assert stats["method"] == "robust" and report["per_batch"]["method"] == "robust"
    # one overall CC1/2 in the JSON; the shells' weighted mean is named as such
    assert "cc_half_overall" not in json.dumps(report)
    log = open(tmp_path / "dials.vmerge.merge.log").read()
    assert "Merging statistics by resolution bin (merging.method=robust):" in log
    assert "merged intensities of merging.method=robust" in log
    assert "Statistics against batch (merging.method=robust" in log
    (cc_row,) = [r for r in report["summary_table"]["rows"] if r[0] == "CC half"]
    assert cc_row[-1 if report["summary_table"]["columns"][-1] == "Overall" else 1] == \
        stats["overall"]["cc_half"]


def test_normalised_deviations_against_plain_loops(sim):
    from dials_vmerge.merging.diagnostics import normalised_deviation_summary

    groups = Groupings(sim.miller_index, sim.space_group, sim.unit_cell).get(False)
    group_of = groups.group_of_original()
    expected = []
    for g in range(groups.n_groups):
        rows = np.flatnonzero(group_of == g)
        if len(rows) < 2:
            continue
        w = 1.0 / sim.sigma[rows] ** 2
        mean = (w * sim.intensity[rows]).sum() / w.sum()
        n = len(rows)
        expected += list(np.sqrt((n - 1) / n) * (sim.intensity[rows] - mean) / sim.sigma[rows])
    expected = np.sort(expected)
    summary = normalised_deviation_summary(groups, sim.intensity, sim.sigma)
    assert summary["n"] == len(expected)
    assert summary["sd"] == pytest.approx(expected.std(), rel=1e-10)
    histogram = summary["histogram"]
    counts, _ = np.histogram(expected, bins=np.linspace(-6, 6, 121))
    assert histogram["counts"] == counts.tolist()
    observed = np.array(summary["probability_plot"]["observed"])
    k = np.unique(np.round(np.linspace(0, len(expected) - 1, 1000)).astype(int))
    # the summary stores 6 significant digits: relative error up to 5e-6
    np.testing.assert_allclose(observed, expected[k], rtol=5e-6, atol=1e-12)
    from scipy.stats import norm

    np.testing.assert_allclose(summary["probability_plot"]["expected"],
                               norm.ppf((k + 0.5) / len(expected)), rtol=5e-6)


def _truth_scaled_merge(anomalous):
    """A simulated sweep with its true scales as the scaling result, merged."""
    import types

    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.merging.api import merge_scaled_table
    from dials_vmerge.simulate import simulate_rotation

    experiments, table, truth = simulate_rotation(
        n_obs_target=30000, n_sweeps=1, seed=7, anomalous=anomalous, bijvoet_ratio=0.3,
        mean_i_over_sigma=30.0, split_fraction=0.0, d_min=2.5)
    table.set_column("intensity.scale.value", table["intensity.sum.value"], "double")
    table.set_column("intensity.scale.variance", table["intensity.sum.variance"], "double")
    # the raw summation counts are g J partiality qe / lp: all of that is the scale here
    scale = truth.inverse_scale_factor * table["partiality"] * table["qe"] / table["lp"]
    table.set_column("inverse_scale_factor", scale, "double")
    params = types.SimpleNamespace(merging=types.SimpleNamespace(method=["classical"]))
    return merge_scaled_table(table, ExperimentList.from_dict(experiments), params)


def test_anomalous_correlation_ratio_sees_the_simulated_signal():
    with_signal = _truth_scaled_merge(True).diagnostics["anomalous"]
    without = _truth_scaled_merge(False).diagnostics["anomalous"]
    low_res = slice(0, 10)
    ratio = np.array(with_signal["correlation_ratio"]["ratio"][low_res], dtype=float)
    no_signal = np.array(without["correlation_ratio"]["ratio"], dtype=float)
    # about 2 with this signal (measured: shells 1.4-2.6, median 1.98); data without signal
    # give 1 (checked next), so 1.5 separates the two with room for the shells' noise
    assert np.median(ratio) > 1.5, ratio
    assert 0.7 < np.median(no_signal) < 1.3, no_signal
    # the normalised differences of data without signal are close to a unit normal
    normal = without["normal_plot"]
    slope = np.polyfit(normal["expected"], normal["observed"], 1)[0]
    assert 0.8 < slope < 1.4, slope
