"""Merging's memory savings must not change a number: groupings computed once and shared
(or derived for a subset of rows) against groupings computed afresh, the numpy rank and the
scipy.special quantiles against hand values and scipy.stats, the observations read lazily
from the table against an eager reading, and the memory itself."""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from cctbx import sgtbx, uctbx
from cctbx.array_family import flex

from merging_simulation import simulate
from quartz_helpers import QUARTZ

from dials_vmerge import flags
from dials_vmerge.merging.api import HalfDatasetMerger, merge_scaled_table, scaled_observations
from dials_vmerge.merging.groups import (
    Groupings,
    group_observations,
    map_indices_to_asu,
    sort_into_groups,
)
from dials_vmerge.merging.halfdataset import average_ranks, half_dataset_statistics, spearman
from dials_vmerge.merging.statistics import (
    anomalous_signal_statistics,
    cc_significance,
    cctbx_draws_needed,
    half_split_kernel,
    merging_statistics,
)

GROUP_FIELDS = ("permutation", "group_start", "asu_index", "centric", "epsilon", "dstar_sq")


def _assert_same_grouping(a, b):
    for name in GROUP_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


# -- ranks and quantiles ------------------------------------------------------------------------
def test_average_ranks_hand_computed_with_ties():
    # sorted: 5 | 7 7 | 10 | 20 20 20 -> ranks 1 | 2, 3 | 4 | 5, 6, 7; ties take their mean
    values = np.array([10.0, 20.0, 20.0, 5.0, 20.0, 7.0, 7.0])
    np.testing.assert_array_equal(average_ranks(values), [4.0, 6.0, 6.0, 1.0, 6.0, 2.5, 2.5])
    np.testing.assert_array_equal(average_ranks(np.array([3.0])), [1.0])
    assert average_ranks(np.zeros(0)).shape == (0,)
    # any NaN: every rank NaN (scipy's rankdata with nan_policy='propagate')
    assert np.all(np.isnan(average_ranks(np.array([1.0, np.nan, 2.0]))))


def test_spearman_with_ties_equals_scipy():
    from scipy.stats import rankdata  # the reference; the merging path must not import it

    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 500).astype(float)  # many ties
    y = x + rng.integers(-2, 3, 500)
    np.testing.assert_array_equal(average_ranks(x), rankdata(x))
    # Spearman with ties = Pearson of the average ranks; 1 - 6 sum d^2 / (n (n^2 - 1)) holds
    # only without ties, so check the tie-free case against that formula too.
    z = rng.permutation(50).astype(float)
    w = z + rng.normal(0, 5, 50)
    d = average_ranks(z) - average_ranks(w)
    assert spearman(z, w) == pytest.approx(1 - 6 * (d**2).sum() / (50 * (50**2 - 1)), rel=1e-12)
    assert -1 <= spearman(x, y) <= 1


def test_quantiles_equal_scipy_stats():
    from scipy import stats

    # t_{0.99, 10} = 2.764 in printed tables (4 figures, hence the tolerance)
    significant, critical = cc_significance(0.7, 12, 0.01)
    assert significant and critical == pytest.approx(2.764 / np.sqrt(10 + 2.764**2), rel=2e-4)
    for n in (3, 5, 40, 1000, 100000):
        t = stats.t.ppf(0.99, n - 2)
        assert cc_significance(0.1, n, 0.01)[1] == t / np.sqrt(n - 2 + t * t)
    # the probability plot: the normal quantiles of (i - 1/2)/n against the sorted dI/sigma
    rng = np.random.default_rng(1)
    i_plus, i_minus = rng.normal(100, 10, 301), rng.normal(100, 10, 301)
    s = np.full(301, 10.0)
    ours = anomalous_signal_statistics(i_plus, i_minus, s, s, probability_plot=True)
    y = np.sort((i_plus - i_minus) / np.sqrt(2 * 100.0))
    x = stats.norm.ppf((np.arange(1, 302) - 0.5) / 301)
    keep = np.abs(x) < 0.9
    slope = np.polyfit(x[keep], y[keep], 1)[0]
    assert ours["anom_probability_slope"] == pytest.approx(slope, rel=1e-10)
    assert ours["anom_probability_slope_all_data"] == pytest.approx(np.polyfit(x, y, 1)[0],
                                                                   rel=1e-10)


# -- groupings -------------------------------------------------------------------------------
@pytest.mark.parametrize("symbol, cell", [
    ("P 1", (30, 40, 50, 80, 85, 95)),
    ("P 43 21 2", (50, 50, 70, 90, 90, 90)),
    ("P 65 2 2", (40, 40, 60, 90, 90, 120)),
    ("R 3 :R", (50, 50, 50, 80, 80, 80)),
    ("I 21 3", (80, 80, 80, 90, 90, 90)),
    ("P 1 21 1 (a-c,b,c)", (50, 60, 70, 90, 100, 90)),
])
@pytest.mark.parametrize("anomalous", [False, True])
def test_grouping_packed_keys_and_subsets_equal_fresh_grouping(symbol, cell, anomalous):
    sg = sgtbx.space_group_info(symbol).group()
    uc = uctbx.unit_cell(cell)
    rng = np.random.default_rng(7)
    # more rows than one cctbx slice (ASU_CHUNK), so the slicing is exercised
    hkl = rng.integers(-20, 21, size=(70000, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    groups = group_observations(hkl, sg, anomalous, uc)
    # the (n, 3) lexicographic sort the packed int64 keys replace
    asu, _ = map_indices_to_asu(hkl, sg, anomalous)
    permutation, group_start = sort_into_groups(asu)
    np.testing.assert_array_equal(groups.permutation, permutation)
    np.testing.assert_array_equal(groups.group_start, group_start)
    np.testing.assert_array_equal(groups.asu_index, asu[permutation[group_start[:-1]]])
    keep = rng.random(len(hkl)) < 0.3
    _assert_same_grouping(groups.subset(keep), group_observations(hkl[keep], sg, anomalous, uc))
    other = uctbx.unit_cell(tuple(1.01 * c if i < 3 else c for i, c in enumerate(cell)))
    shared = Groupings(hkl, sg, uc)
    assert shared.get(anomalous) is shared.get(anomalous)  # computed once
    _assert_same_grouping(shared.get(anomalous, other),
                          group_observations(hkl, sg, anomalous, other))
    _assert_same_grouping(shared.subset(keep).get(anomalous, other),
                          group_observations(hkl[keep], sg, anomalous, other))


def _noisy_simulation(seed):
    """Weak high-resolution data (CC1/2 falls, so a cut is suggested) with a few sigma <= 0."""
    sim = simulate(seed=seed, d_min=2.0, wilson_b=90.0, scale=200.0, n_batches=30)
    rng = np.random.default_rng(seed)
    sigma = sim.sigma.copy()
    sigma[rng.random(len(sigma)) < 0.02] = 0.0
    sigma[:3] = -1.0
    intensity = sim.intensity + rng.normal(0, 3, len(sigma)) * sim.sigma
    return sim, intensity, sigma


def test_statistics_with_shared_groupings_equal_separate_computation():
    sim, intensity, sigma = _noisy_simulation(0)
    separate = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                                  sim.unit_cell, n_bins=10, with_anomalous_table=True)
    assert separate.cut_statistics is not None  # the test covers the cut data too
    # Merging's groupings carry the median cell, the statistics the symmetrised one.
    a, b, c, al, be, ga = sim.unit_cell.parameters()
    median = uctbx.unit_cell((a * 1.0001, b * 0.9999, c, al, be, ga))
    groupings = Groupings(sim.miller_index, sim.space_group, median)
    shared = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                                sim.unit_cell, n_bins=10, with_anomalous_table=True,
                                groupings=groupings)
    assert shared.as_dict() == separate.as_dict()
    assert shared.format_summary() == separate.format_summary()
    # the same groupings, used again, still give the same numbers
    again = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                               sim.unit_cell, n_bins=10, with_anomalous_table=True,
                               groupings=groupings)
    assert again.as_dict() == separate.as_dict()


@pytest.mark.parametrize("method", ["classical", "variational"])
def test_half_dataset_with_shared_groupings_equals_fresh(method):
    sim = simulate(seed=4, d_min=3.0, n_batches=20)
    args = (sim.miller_index, sim.intensity, sim.sigma, sim.batch, sim.space_group,
            sim.unit_cell, HalfDatasetMerger(method))
    fresh = half_dataset_statistics(*args, repeats=3, seed=2, n_bins=4)
    groupings = Groupings(sim.miller_index, sim.space_group, sim.unit_cell)
    assert half_dataset_statistics(*args, repeats=3, seed=2, n_bins=4,
                                   groupings=groupings) == fresh


def test_random_draws_cover_the_worst_case():
    # groups of 1, 2, 3, 5 observations; draws all 0 (< 0.5), so odd groups give the extra
    # observation to the first half: 0 + 1 + (1 + 2) + (1 + 3) = 8 draws
    sizes = np.array([1, 2, 3, 5])
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(group_start[-1])

    class Sizes:
        multiplicity = sizes

    assert cctbx_draws_needed(Sizes) == 8
    values = np.arange(1.0, n + 1)
    order = np.arange(4, dtype=np.int64)
    permutation = np.arange(n, dtype=np.int64)[::-1].copy()
    h1, h2 = half_split_kernel(values, np.ones(n), permutation, group_start, order,
                               np.zeros(8), False)
    # group 1 holds rows permutation[1:3] = (9, 8) -> values 10, 9: first half takes 10
    assert np.isnan(h1[0]) and h1[1] == 10.0 and h2[1] == 9.0
    with pytest.raises(ValueError):
        half_split_kernel(values, np.ones(n), permutation, group_start, order, np.zeros(7),
                          False)


# -- observations read from the table ---------------------------------------------------------
def _eager_reference(table, experiments):
    """The merged observations and unmerged-MTZ columns, read the plain way (every column in
    memory, rows selected, partials summed with a Python dict)."""
    from dials_vmerge.batches import batch_numbers

    g = table["inverse_scale_factor"]
    keep = (~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0)
            & (table["intensity.scale.variance"] > 0))
    rows = np.flatnonzero(keep)
    parts = {}
    for r in rows.tolist():  # small test table
        parts.setdefault(int(table["partial_id"][r]), []).append(r)
    first = np.array(sorted(min(p) for p in parts.values()))
    members = {min(p): p for p in parts.values()}
    fraction = np.array([table["partiality"][members[r]].sum() for r in first])
    intensity = np.array([(table["intensity.scale.value"][members[r]] / g[members[r]]).sum()
                          for r in first])
    ok = fraction >= 0.4
    first, fraction, intensity = first[ok], fraction[ok], intensity[ok]
    return {"rows": first, "intensity": intensity, "FRACTIONCALC": fraction,
            "batch": batch_numbers(table, experiments)[first], "scale": g[first]}


def test_merge_reads_no_column_into_the_table_and_unmerged_columns_match(tmp_path):
    from dials_vmerge.io import read_experiments, read_reflections

    experiments = read_experiments(os.path.join(QUARTZ, "scaled.expt"))
    table = read_reflections(os.path.join(QUARTZ, "scaled.refl"))
    lazy = [name for name in table.keys() if table.is_lazy(name)]
    assert "intensity.scale.value" in lazy and "miller_index" in lazy
    result = merge_scaled_table(table, experiments, None)
    obs = result.observations
    # merging peeked at its columns: none was materialised into the caller's table
    assert [name for name in lazy if not table.is_lazy(name)] == []
    reference = _eager_reference(read_reflections(os.path.join(QUARTZ, "scaled.refl")),
                                 experiments)
    assert len(obs) == len(reference["rows"])
    np.testing.assert_allclose(obs.intensity, reference["intensity"], rtol=1e-12)
    np.testing.assert_array_equal(obs.batch, reference["batch"])
    np.testing.assert_array_equal(obs.scale, reference["scale"])
    np.testing.assert_allclose(obs.extra["FRACTIONCALC"], reference["FRACTIONCALC"],
                               rtol=1e-12)
    # DIALS's quartz file has no QE column: QE = 1, as dials.export writes it
    assert "qe" not in table and np.all(obs.extra["QE"] == 1)
    assert set(obs.extra) == {"BG", "SIGBG", "FRACTIONCALC", "LP", "XDET", "YDET", "ROT", "QE"}
    assert all(len(v) == len(obs) for v in obs.extra.values())
    assert [name for name in lazy if not table.is_lazy(name)] == []
    # with a resolution cut the lazily read columns are cut the same way
    cut = scaled_observations(table, experiments, d_min=2.0, unit_cell=result.unit_cell)
    hkl = read_reflections(os.path.join(QUARTZ, "scaled.refl"))["miller_index"]
    d = result.unit_cell.d(flex.miller_index(
        [tuple(h) for h in hkl[reference["rows"]].tolist()])).as_numpy_array()
    keep = d >= 2.0
    assert 0 < len(cut) < len(obs) and len(cut) == keep.sum()
    np.testing.assert_array_equal(cut.batch, reference["batch"][keep])
    np.testing.assert_array_equal(cut.extra["ROT"], obs.extra["ROT"][keep])


def test_merge_path_does_not_import_scipy_stats(tmp_path):
    # scipy.stats costs ~25 MB of resident memory; dials.vmerge.merge must not load it.
    script = (
        "import sys\n"
        "from dials_vmerge.command_line.merge import main\n"
        f"assert main([{os.path.join(QUARTZ, 'scaled.expt')!r}, "
        f"{os.path.join(QUARTZ, 'scaled.refl')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_merging_statistics_memory_per_observation():
    # ~90 B/observation here with the groupings made inside (numpy data, as traced); ~270
    # B/observation before the groupings were shared and the sorted copies dropped.
    sim = simulate(seed=5, d_min=1.4, n_batches=50)
    n = len(sim.intensity)
    assert n > 150000
    merging_statistics(sim.miller_index[:3000], sim.intensity[:3000], sim.sigma[:3000],
                       sim.space_group, sim.unit_cell, with_anomalous_table=True)  # compile
    tracemalloc.start()
    try:
        merging_statistics(sim.miller_index, sim.intensity, sim.sigma, sim.space_group,
                           sim.unit_cell, with_anomalous_table=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / n < 150


@pytest.mark.parametrize("symbol", ["P 1", "P -1", "C 1 2 1", "P 43 21 2", "P 61 2 2",
                                    "R 3 :H", "I 2 3", "P 4/m m m", "F d -3 m"])
def test_non_anomalous_grouping_derived_from_the_anomalous_one_equals_a_fresh_one(symbol):
    """Groupings.get(False) after get(True) maps the anomalous groups instead of every
    observation: the same grouping as group_observations(..., False) in every field."""
    from cctbx import sgtbx, uctbx

    from dials_vmerge.merging.groups import (Groupings, group_observations,
                                             non_anomalous_from_anomalous)

    space_group = sgtbx.space_group_info(symbol).group()
    cell = space_group.average_unit_cell(uctbx.unit_cell((50, 60, 70, 90, 100, 110)))
    hkl = np.random.default_rng(7).integers(-9, 10, size=(20000, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    fresh = group_observations(hkl, space_group, False, cell)
    anomalous = group_observations(hkl, space_group, True, cell)
    derived = non_anomalous_from_anomalous(anomalous, space_group, cell)
    groupings = Groupings(hkl, space_group, cell)
    groupings.get(True)
    for grouping in (derived, groupings.get(False)):
        assert not grouping.anomalous
        for name in ("permutation", "group_start", "asu_index", "centric", "epsilon",
                     "dstar_sq"):
            np.testing.assert_array_equal(getattr(grouping, name), getattr(fresh, name))
            assert getattr(grouping, name).dtype == getattr(fresh, name).dtype
