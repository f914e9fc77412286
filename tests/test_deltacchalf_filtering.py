"""filtering.method=deltacchalf on simulated narrow wedges, two of them corrupted (noise x5):
exactly those are removed, the ΔCC½ values equal an independent leave-one-out computation,
and the scales of the other datasets come closer to the simulator's truth."""

import copy
import logging

import numpy as np
import pytest

from test_truth_recovery import (ORTHORHOMBIC, remove_global_k_and_b, rms_relative,
                                 scaling_params)
from dials_vmerge import flags
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.scaling.filtering import scale_and_filter
from dials_vmerge.simulate import simulate_rotation

LOG = logging.getLogger("test_deltacchalf_filtering")
CORRUPTED = [5, 17]
NOISE_FACTOR = 5.0
# Standard outlier rejection (zmax 6) flags most rows of a dataset with 5x the noise its
# sigmas claim; ΔCC½ then sees only what is left (as in dials.scale) and the corruption is
# hidden. Raising zmax lets the corruption reach the ΔCC½ analysis, which is what is tested.
SETTINGS = ["model=physical", "outlier_zmax=1000"]


@pytest.fixture(scope="module")
def corrupted_wedges():
    experiments, table, truth = simulate_rotation(
        n_obs_target=60_000, n_sweeps=40, model="physical", seed=3, multiplicity=6.5,
        mean_i_over_sigma=10.0, sweep_scale_sigma=0.0, **ORTHORHOMBIC)
    rng = np.random.default_rng(1)
    bad = np.isin(table["id"], CORRUPTED)
    for kind in ("sum", "prf"):
        value = table[f"intensity.{kind}.value"].copy()
        sigma = np.sqrt(np.maximum(table[f"intensity.{kind}.variance"][bad], 0))
        # total noise NOISE_FACTOR times the simulated one, sigmas unchanged
        value[bad] += np.sqrt(NOISE_FACTOR ** 2 - 1) * sigma * rng.standard_normal(bad.sum())
        table[f"intensity.{kind}.value"] = value
    table["truth_row"] = np.arange(table.nrows, dtype=np.uint64)
    return experiments, table, truth


def independent_delta_cc_half(table, experiments, partiality_cutoff):
    """{id: ΔCC½} written with numpy and cctbx alone from DIALS's definition: rows not bad
    for scaling, g > 0, V > 0, partiality >= cutoff; x = I/g; non-anomalous ASU in the mean
    cell; 10 equal bins of 1/d² over the data; per bin the sigma-tau CC½ of the unique
    reflections with n > 1, averaged with their counts as weights; recomputed from scratch
    with each dataset left out."""
    from cctbx import crystal, miller, uctbx
    from cctbx.array_family import flex

    from dials_vmerge.geometry import space_group, unit_cell

    g = table["inverse_scale_factor"]
    keep = (~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0)
            & (table["intensity.scale.variance"] > 0)
            & (table["partiality"] >= partiality_cutoff))
    x = table["intensity.scale.value"][keep] / g[keep]
    dataset = table["id"][keep]
    cell = uctbx.unit_cell(tuple(np.mean([unit_cell(e).parameters() for e in experiments],
                                         axis=0)))
    symmetry = crystal.symmetry(unit_cell=cell, space_group=space_group(experiments[0]))
    indices = flex.miller_index([tuple(int(v) for v in h) for h in table["miller_index"][keep]])
    asu = miller.set(symmetry, indices, anomalous_flag=False).map_to_asu()
    d_star_sq = 1.0 / np.array(asu.d_spacings().data()) ** 2
    _, unique = np.unique(np.array(asu.indices()), axis=0, return_inverse=True)
    unique = unique.ravel()
    edges = np.linspace(d_star_sq.min(), d_star_sq.max(), 11)

    def cc_half(rows):
        n = np.bincount(unique[rows], minlength=unique.max() + 1)
        s = np.bincount(unique[rows], x[rows], minlength=n.size)
        mean = s / np.maximum(n, 1)
        dev2 = np.bincount(unique[rows], (x[rows] - mean[unique[rows]]) ** 2, minlength=n.size)
        ok = n > 1
        var = dev2[ok] / (n[ok] - 1) / n[ok]
        dss = np.zeros(n.size)
        dss[unique[rows]] = d_star_sq[rows]
        b = np.clip(np.searchsorted(edges, dss[ok], side="right") - 1, 0, 9)
        total = weight = 0.0
        for k in range(10):
            m, v = mean[ok][b == k], var[b == k]
            if len(m) > 1:
                sigma_y, sigma_e = np.var(m, ddof=1), np.mean(v)
                total += len(m) * (sigma_y - sigma_e) / (sigma_y + sigma_e)
                weight += len(m)
        return total / weight

    everything = np.arange(len(x))
    cc_all = cc_half(everything)
    return {int(k): cc_all - cc_half(np.flatnonzero(dataset != k)) for k in np.unique(dataset)}


def clean_rows_error(experiments, table, truth):
    """RMS relative error of g against the truth on the scaled rows of the clean datasets,
    after the global K and B the data cannot determine (test_truth_recovery)."""
    scaled = table.get_flags(flags.scaled) & ~np.isin(table["id"], CORRUPTED)
    true_g = truth.inverse_scale_factor[table["truth_row"][scaled].astype(np.int64)]
    log_ratio = np.log(table["inverse_scale_factor"][scaled] / true_g)
    residual, _ = remove_global_k_and_b(log_ratio, table["d"][scaled])
    return rms_relative(residual)


def test_deltacchalf_removes_exactly_the_corrupted_datasets(corrupted_wedges, tmp_path,
                                                            monkeypatch):
    experiments_dict, table, truth = corrupted_wedges
    params = scaling_params(*SETTINGS, "filtering.method=deltacchalf")
    checked = {}

    def scale_and_check(params, experiments, table, log):
        experiments, table, summary = run_scaling_job(params, experiments, table, log)
        if not checked:  # the first cycle: recompute its ΔCC½ independently
            checked.update(independent_delta_cc_half(table, experiments,
                                                     params.cut_data.partiality_cutoff))
        return experiments, table, summary

    experiments, scaled, summary = scale_and_filter(
        params, ExperimentList.from_dict(copy.deepcopy(experiments_dict)), table.copy(), LOG,
        scale=scale_and_check)
    results = summary["filtering"]
    cycles = results["cycle_results"]
    first = cycles["1"]
    ours = dict(zip(first["delta_cc_half_groups"], first["delta_cc_half_values"]))
    assert sorted(ours) == sorted(checked) and len(ours) == 40
    np.testing.assert_allclose([ours[k] for k in sorted(ours)],
                               [checked[k] for k in sorted(ours)], rtol=1e-8, atol=1e-12)
    removed = [i for c in cycles.values() for i in c["removed_ids"]]
    # Reached: cycle 1 removes 17 (ΔCC½ -0.47%, cutoff -0.38%; 5 at -0.29%), cycle 2 removes 5
    # (-0.41%, cutoff -0.27%), cycle 3 nothing (lowest -0.05%, cutoff -0.09%).
    assert sorted(removed) == CORRUPTED
    assert results["termination_reason"] == "no_more_removed"
    assert cycles[str(len(cycles))]["n_removed"] == 0
    # removed datasets are absent from the output
    assert not np.isin(scaled["id"], CORRUPTED).any()
    assert sorted(scaled.identifiers) == sorted(set(range(40)) - set(CORRUPTED))
    assert len(experiments) == 38
    assert {e.identifier for e in experiments} == set(scaled.identifiers.values())
    assert results["mode"] == "dataset"
    # truth recovery of the other datasets improves on scaling everything once
    unfiltered_experiments, unfiltered, _ = run_scaling_job(
        scaling_params(*SETTINGS), ExperimentList.from_dict(copy.deepcopy(experiments_dict)),
        table.copy(), LOG)
    before = clean_rows_error(unfiltered_experiments, unfiltered, truth)
    after = clean_rows_error(experiments, scaled, truth)
    # reached 2.12% unfiltered, 1.79% filtered
    assert after < 0.9 * before, (before, after)


def test_image_group_mode_excludes_a_corrupted_sweep_end(tmp_path, monkeypatch):
    """dials.vmerge with mode=image_group on the quartz sweep given twice, the last 10 images
    of the second copy corrupted (noise x5): that group is removed through the valid image
    range, its rows are flagged, and scale_and_filter_results.json has DIALS's layout."""
    import json

    from quartz_helpers import two_quartz_sweep_paths
    from dials_vmerge.command_line.vmerge import main
    from dials_vmerge.io import read_experiments, read_reflections, write_reflections

    expts, refls = two_quartz_sweep_paths(tmp_path)
    table = read_reflections(refls[1])
    image = np.floor(table["xyzobs.px.value"][:, 2]).astype(int) + 1
    bad = image > 90
    rng = np.random.default_rng(2)
    for kind in ("sum", "prf"):
        value = table[f"intensity.{kind}.value"].copy()
        sigma = np.sqrt(np.maximum(table[f"intensity.{kind}.variance"][bad], 0))
        value[bad] += np.sqrt(NOISE_FACTOR ** 2 - 1) * sigma * rng.standard_normal(bad.sum())
        table[f"intensity.{kind}.value"] = value
    write_reflections(table, refls[1])
    monkeypatch.chdir(tmp_path)
    # 20 groups cannot put one of them 4 sd below the mean (two identical groups at 61-70
    # images have ΔCC½ +2.3% and widen the sd to 0.64%): stdcutoff 1 (the corrupted group is at
    # -0.33%, the cutoff -0.15%, the next group +0.07%), one cycle, then the final rescale.
    assert main([expts[0], refls[0], expts[1], refls[1], "filtering.method=deltacchalf",
                 "filtering.deltacchalf.mode=image_group", "outlier_zmax=1000",
                 "filtering.deltacchalf.stdcutoff=1", "filtering.deltacchalf.max_cycles=1"]) == 0
    results = json.load(open("scale_and_filter_results.json"))
    assert set(results) >= {"termination_reason", "initial_n_reflections",
                            "initial_expids_and_image_ranges", "expids_and_image_ranges",
                            "cycle_results", "final_stats"}
    first = results["cycle_results"]["1"]
    assert set(first) >= {"merging_stats", "delta_cc_half_values", "mean_cc_half",
                          "image_ranges_removed", "removed_datasets", "removed_ids",
                          "n_removed", "cumul_percent_removed"}
    assert len(first["delta_cc_half_values"]) == 20  # 10 groups of 10 images per sweep
    removed = [r for c in results["cycle_results"].values() for r in c["image_ranges_removed"]]
    assert removed == [[[91, 100], 1]]
    assert results["expids_and_image_ranges"][1] == ["second-sweep", [[1, 90]]]
    assert results["termination_reason"] == "max_cycles" and results["final_stats"]
    experiments = read_experiments("scaled.expt")
    assert experiments[1].scan["valid_image_ranges"]["second-sweep"] == [[1, 90]]
    # the cycles scale without the full-matrix round; the final rescale has it (auto: two
    # rotation datasets), so the parameters have ESDs
    assert max(experiments[0].scaling_model["scale"]["est_standard_devs"]) > 0
    scaled = read_reflections("scaled.refl")
    image = np.floor(scaled["xyzobs.px.value"][:, 2]).astype(int) + 1
    end = (scaled["id"] == 1) & (image > 90)
    assert end.sum() > 50
    assert scaled.get_flags(flags.user_excluded_in_scaling)[end].all()
    assert not scaled.get_flags(flags.scaled)[end].any()


def test_dataset_mode_on_one_dataset_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import os

    from dials_vmerge.command_line.vmerge import main
    from quartz_helpers import QUARTZ

    monkeypatch.chdir(tmp_path)
    assert main([os.path.join(QUARTZ, "integrated.expt"), os.path.join(QUARTZ, "integrated.refl"),
                 "filtering.method=deltacchalf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dials.vmerge: error: filtering.method=deltacchalf: one dataset cannot be "
                   "filtered in mode=dataset; use filtering.deltacchalf.mode=image_group"]
    assert os.listdir(tmp_path) == []
