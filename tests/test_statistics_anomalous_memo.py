"""The statistics table with I+ and I- apart (with_anomalous_table) reuses the CCanom and Ranom
of the table with them together, shell by shell: the reused values must equal the anomalous
table computed on its own (merging_statistics(anomalous=True), no reuse), for the data and
for the data cut at the CC1/2 fit, and the anomalous differences must be computed once per
shell."""

import numpy as np

from merging_simulation import simulate

from dials_vmerge.merging import statistics
from dials_vmerge.merging.statistics import (merging_statistics, per_index_chunks,
                                             symmetry_compatible_cell)


def _data(seed):
    # weak high-resolution data: CC1/2 falls, so a cut is suggested
    sim = simulate(seed=seed, d_min=2.0, wilson_b=90.0, scale=200.0, n_batches=30)
    rng = np.random.default_rng(seed)
    sigma = sim.sigma.copy()
    sigma[rng.random(len(sigma)) < 0.02] = 0.0  # rows left out (a subset grouping)
    intensity = sim.intensity + rng.normal(0, 3, len(sigma)) * sim.sigma
    return sim, intensity, sigma


def test_reused_anomalous_differences_equal_a_separate_anomalous_table(monkeypatch):
    sim, intensity, sigma = _data(0)
    calls = []
    computed = statistics._anomalous_differences

    def counting(*args):
        calls.append(1)
        return computed(*args)

    monkeypatch.setattr(statistics, "_anomalous_differences", counting)
    both = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                              sim.unit_cell, n_bins=10, with_anomalous_table=True)
    n_with_reuse = len(calls)
    assert both.cut_statistics is not None  # the cut data are covered too
    calls.clear()
    alone = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                               sim.unit_cell, n_bins=10, anomalous=True, suggest_cut=False)
    n_alone = len(calls)
    assert both.anomalous_statistics.as_dict() == alone.as_dict()
    assert both.anomalous_statistics.format_summary() == alone.format_summary()
    cut = both.cut_statistics
    d_fit = both.d_min_cc_half_fit
    # the cut's rows as merging_statistics selects them
    cell = symmetry_compatible_cell(sim.unit_cell, sim.space_group)
    keep = np.sqrt(per_index_chunks(np.asarray(sim.miller_index, dtype=np.int32).reshape(-1, 3),
                                    cell.d_star_sq)) <= 1.0 / d_fit
    cut_alone = merging_statistics(np.asarray(sim.miller_index)[keep], intensity[keep],
                                   sigma[keep], sim.space_group, sim.unit_cell, n_bins=10,
                                   anomalous=True, suggest_cut=False)
    assert cut.anomalous_statistics.as_dict() == cut_alone.as_dict()
    # CCanom was in the tables before the reuse: not a vacuous comparison
    assert any(s.cc_anom_n_pairs > 0 for s in alone.shells)
    # each table pair computes its anomalous differences once per shell (+ overall):
    # the full data and the cut data, against twice that without the reuse
    assert n_with_reuse == 2 * n_alone


def test_anomalous_summary_with_the_groupings_partners_equals_a_fresh_computation(monkeypatch):
    """merge_diagnostics' normal probability plot of the merged I+ - I-: with the anomalous
    grouping's cached Bijvoet partners and hemisphere (the merged reflections are its groups)
    equal to partners and hemisphere computed afresh from the merged indices."""
    import os

    from quartz_helpers import QUARTZ

    from dials_vmerge.io import read_experiments, read_reflections
    from dials_vmerge.merging import diagnostics
    from dials_vmerge.merging.api import merge_scaled_table
    from dials_vmerge.merging.groups import Groupings

    experiments = read_experiments(os.path.join(QUARTZ, "scaled.expt"))
    table = read_reflections(os.path.join(QUARTZ, "scaled.refl"))
    result = merge_scaled_table(table, experiments, None)
    obs = result.observations
    groupings = Groupings(obs.miller_index, result.space_group, result.unit_cell)
    groups = groupings.get(True)
    np.testing.assert_array_equal(result.merged_anomalous.asu_index, groups.asu_index)
    cached = diagnostics.anomalous_summary(result, groupings)
    assert cached["normal_plot"]["n"] > 100
    # the fresh path: partners and hemisphere from the merged indices themselves
    fresh_groupings = Groupings(obs.miller_index, result.space_group, result.unit_cell)
    monkeypatch.setattr(diagnostics.np, "array_equal", lambda a, b: False)
    fresh = diagnostics.anomalous_summary(result, fresh_groupings)
    assert cached == fresh
