"""Truth recovery on simulated data (issue 4, test 4): dials.vmerge's scaling job (selection,
models, data preparation, the DIALS round order) recovers the simulator's true inverse scale
factors g to < 2% RMS relative error at multiplicity >= 6 and mean I/sigma ~10.

g is compared on the rows the job flags `scaled`, after removing what the data cannot
determine. The scaling target depends on g only through I/g - Ih with a free Ih per unique
reflection, so g and g * c(h) fit equally well for any c that is constant over each unique
reflection. The part of that freedom a model can express is removed before comparing:
  - one overall factor K (every model);
  - physical and KB: one global exp(B / 2d^2). Adding the same B to every dataset's decay
    term multiplies every observation of a unique reflection by the same factor; DIALS pins
    it only through the decay restraint towards B = 0 (physical) or not at all (KB), while the
    simulator draws non-zero B offsets, so the absolute B is not recoverable;
  - array: a smooth function of resolution shared by all datasets (the decay grid is a free
    function of d*^2 at every time point, so any common h(d) is absorbed the same way).

Reached: physical 0.57%, KB stills 0.80%, array 0.63% (200 000 observations, all of them
minimised on; 0.60% to 0.97% over seeds 3-11). The array test departs from the defaults in one
setting, explained at the test: the default reflection selection minimises on a subset of
~50 000 observations, which holds the array error at 2.4% to 3.3% whatever the dataset size.
"""

import copy
import logging

import iotbx.phil
import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.cli import load_phil_text
from dials_vmerge.geometry import space_group
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.scaling.ih_table import map_indices_to_asu
from dials_vmerge.simulate import simulate_rotation, simulate_stills

LOG = logging.getLogger("test_truth_recovery")
# An orthorhombic cell: 8 equivalents per unique reflection, so multiplicity 6 on two sweeps
# needs ~75 degrees per sweep, above DIALS's 60-degree threshold for auto absorption.
ORTHORHOMBIC = dict(space_group="P 21 21 21", unit_cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0))
# 6.5 requested so that the multiplicity of the scaled rows (after partial summation and the
# partiality cut) is still >= 6.
MULTIPLICITY = 6.5
RESOLUTION_NODES = 24


def scaling_params(*args):
    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


def scale_simulation(simulation, *args):
    """Run the library scaling job on a simulation; returns (experiments, table, truth g)."""
    experiments_dict, table, truth = simulation
    table = table.copy()
    # Partial summation deletes rows, so carry the row number through the job.
    table["truth_row"] = np.arange(table.nrows, dtype=np.uint64)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    experiments, scaled, _ = run_scaling_job(scaling_params(*args), experiments, table, LOG)
    true_g = truth.inverse_scale_factor[scaled["truth_row"].astype(np.int64)]
    return experiments, scaled, true_g


def rms_relative(log_ratio):
    return float(np.sqrt(np.mean(np.expm1(log_ratio) ** 2)))


def remove_global_k_and_b(log_ratio, d):
    """Residual of log(g / g_true) after a least-squares log K + B / (2 d^2)."""
    design = np.stack([np.ones_like(d), 0.5 / d ** 2], axis=1)
    coefficients = np.linalg.lstsq(design, log_ratio, rcond=None)[0]
    return log_ratio - design @ coefficients, coefficients


def remove_shared_resolution_function(log_ratio, d, n_nodes=RESOLUTION_NODES):
    """Residual after a piecewise-linear function of d*^2 (twice the model's 12 nodes)."""
    dstar_sq = 1.0 / d ** 2
    nodes = np.linspace(dstar_sq.min(), dstar_sq.max(), n_nodes)
    width = nodes[1] - nodes[0]
    basis = np.clip(1.0 - np.abs(dstar_sq[:, None] - nodes[None, :]) / width, 0.0, None)
    return log_ratio - basis @ np.linalg.lstsq(basis, log_ratio, rcond=None)[0]


def remove_per_unique_reflection(log_ratio, asu_index):
    """Residual after one factor per unique reflection (everything the target cannot see)."""
    _, group = np.unique(asu_index, axis=0, return_inverse=True)
    group = group.ravel()
    mean = np.bincount(group, log_ratio) / np.bincount(group)
    return log_ratio - mean[group]


def scaled_rows(experiments, table, true_g):
    scaled = table.get_flags(flags.scaled)
    log_ratio = np.log(table["inverse_scale_factor"][scaled] / true_g[scaled])
    asu = map_indices_to_asu(table["miller_index"][scaled], space_group(experiments[0]), False)
    return scaled, log_ratio, table["d"][scaled], asu


def check_data_quality(table, asu, scaled):
    """The premise of the test: multiplicity >= 6 and mean I/sigma ~10 on the scaled rows."""
    multiplicity = len(asu) / len(np.unique(asu, axis=0))
    assert multiplicity >= 6.0, f"multiplicity of the scaled rows is {multiplicity:.2f}"
    i_over_sigma = np.mean(table["intensity.sum.value"][scaled]
                           / np.sqrt(table["intensity.sum.variance"][scaled]))
    assert 8.0 < i_over_sigma < 12.0, f"mean I/sigma (summation) is {i_over_sigma:.2f}"


@pytest.fixture(scope="module")
def physical_two_sweeps():
    return simulate_rotation(n_obs_target=40_000, n_sweeps=2, model="physical", seed=3,
                             multiplicity=MULTIPLICITY, mean_i_over_sigma=10.0, **ORTHORHOMBIC)


def test_physical_two_sweeps_with_absorption(physical_two_sweeps):
    _, _, truth = physical_two_sweeps
    experiments, table, true_g = scale_simulation(physical_two_sweeps, "model=physical")
    for e, true_model in zip(experiments, truth.models):
        _, osc_width = e.scan["oscillation"]
        first, last = e.scan["image_range"]
        assert (last - first + 1) * osc_width > 60.0
        # absorption is on in the truth and, by DIALS's auto rule, in the fitted model
        assert "absorption" in true_model.parameters
        assert "absorption" in e.scaling_model["configuration_parameters"]["corrections"]
    scaled, log_ratio, d, asu = scaled_rows(experiments, table, true_g)
    check_data_quality(table, asu, scaled)
    residual, (log_k, b) = remove_global_k_and_b(log_ratio, d)
    error = rms_relative(residual)
    # reached 0.57% (0.53% within unique reflections); sweeps of 172 images, 86 degrees
    assert error < 0.02, (
        f"physical: RMS relative error of g {error:.4f} (K {np.exp(log_k):.3f}, B {b:.2f})")
    # Without the B term the error is several times larger (1.8%): the global B is free.
    assert rms_relative(log_ratio - log_ratio.mean()) > 2 * error


def _array_simulation(mean_i_over_sigma, seed, n_obs):
    # One sweep of ~150 degrees: the simulator's automatic decay interval (20 degrees) and
    # n_absorption_bins=3 then give exactly DIALS's default array layout (12 x 10 decay grid,
    # 5 x 5 x 10 absorption grid), so the default model can represent the truth.
    return simulate_rotation(n_obs_target=n_obs, n_sweeps=1, model="array", seed=seed,
                             multiplicity=MULTIPLICITY, mean_i_over_sigma=mean_i_over_sigma,
                             n_absorption_bins=3, **ORTHORHOMBIC)


# The array model has 370 unrestrained parameters; at I/sigma ~10 it needs a realistic number
# of observations per parameter (real sweeps have 1e5-1e6 observations; ~530 per parameter here).
ARRAY_N_OBS = 200_000
# Minimise on every observation. The default (DIALS's quasi_random) minimises on random groups
# up to max(2000 groups, 50 000 observations) with I/sigma > 2, a speed choice that caps what
# the fit sees: at the defaults the error below stays at 2.7%, 3.3%, 2.4%, 2.6% for 40 000,
# 100 000, 200 000, 400 000 observations (seed 5; 50 091 selected at 200 000). Selecting every
# group while keeping the I/sigma > 2 preselection (min_reflections above the dataset size)
# reached 0.58%, so it is the subset size, not the I/sigma cut, that limits the default.
ARRAY_SELECTION = "reflection_selection.method=use_all"


def test_array_model_one_sweep():
    simulation = _array_simulation(10.0, seed=5, n_obs=ARRAY_N_OBS)
    experiments, table, true_g = scale_simulation(simulation, "model=array", ARRAY_SELECTION)
    model = experiments[0].scaling_model
    truth_model = simulation[2].models[0]
    assert model["decay"]["n_parameters"] == truth_model.parameters["decay"].size
    assert model["absorption"]["n_parameters"] == truth_model.parameters["absorption"].size
    scaled, log_ratio, d, asu = scaled_rows(experiments, table, true_g)
    check_data_quality(table, asu, scaled)
    # What the data determine: g relative to the other observations of the same reflection.
    within = rms_relative(remove_per_unique_reflection(log_ratio, asu))
    # reached 0.53%
    assert within < 0.02, f"array: RMS relative error of g within unique reflections {within:.4f}"
    shared = rms_relative(remove_shared_resolution_function(log_ratio, d))
    # Reached 0.63% (multiplicity 6.4, mean I/sigma 9.9, ~196 700 scaled rows). Over seeds
    # 3-11 at 200 000 observations: 0.60% to 0.97%; at 250 000 (seeds 3-7): 0.51% to 1.04%; at
    # 150 000 (seeds 3-7): 0.70% to 2.05% (seed 5), so 200 000 keeps a margin. Removing only a
    # global K and B instead of a function of d gives 0.86% to 1.40% over seeds 3-11.
    # These figures are for the default stopping rule (rmsd_tolerance 1e-4, as DIALS). The fit
    # has poorly determined directions: the absorption nodes at the detector corners are seen
    # only by the weak high-resolution spots there. Minimised to rmsd_tolerance 1e-8 the same
    # data give 17% (150 000) and 12% (200 000) up to a function of d (at 150 000 corner
    # absorption parameters of -5.5 and +2.7 appear, and the final Levenberg-Marquardt round
    # stops at its iteration limit); the default stop leaves those directions near their
    # starting value 1 (this seed: 0.997 to 1.000 at the first time node), close to the truth
    # (1 +- 3%). The within-reflection error stays 0.5% to 0.8%
    # either way: it is the comparison with the truth that depends on the stop.
    assert shared < 0.02, f"array: RMS relative error of g up to a function of d {shared:.4f}"


def test_array_model_recovers_truth_at_high_signal():
    """At I/sigma ~300 the same layout recovers the truth to 0.3% on 10 000 observations (the
    default selection then minimises on 10 676 of the 10 695 suitable ones): the model
    represents the truth."""
    simulation = _array_simulation(300.0, seed=5, n_obs=10_000)
    experiments, table, true_g = scale_simulation(simulation, "model=array")
    _, log_ratio, d, _ = scaled_rows(experiments, table, true_g)
    shared = rms_relative(remove_shared_resolution_function(log_ratio, d))
    # reached 0.28% (0.12% at I/sigma 1000)
    assert shared < 0.006, (
        f"array at I/sigma 300: RMS relative error up to a function of d {shared:.5f}")


def test_kb_stills_many_datasets():
    # Each still is its own experiment with its own K and B. A cubic cell (48 equivalents)
    # reaches multiplicity >= 6 with 40 stills.
    simulation = simulate_stills(n_stills=40, seed=3, space_group="P 4 3 2",
                                 unit_cell=(60.0, 60.0, 60.0, 90.0, 90.0, 90.0),
                                 mean_i_over_sigma=10.0)
    experiments, table, true_g = scale_simulation(simulation, "model=KB")
    assert len(experiments) == 40
    assert all(e.scaling_model["__id__"] == "KB" for e in experiments)
    scaled, log_ratio, d, asu = scaled_rows(experiments, table, true_g)
    check_data_quality(table, asu, scaled)
    assert len(np.unique(table["id"][scaled])) == 40
    residual, (log_k, b) = remove_global_k_and_b(log_ratio, d)
    error = rms_relative(residual)
    # reached 0.80% at multiplicity 6.4, mean I/sigma 11
    assert error < 0.02, (
        f"KB stills: RMS relative error of g {error:.4f} (K {np.exp(log_k):.3f}, B {b:.2f})")
    # Per still, the fitted K and B relative to the mean over stills match the truth.
    fitted_k = np.array([e.scaling_model["scale"]["parameters"][0] for e in experiments])
    fitted_b = np.array([e.scaling_model["decay"]["parameters"][0] for e in experiments])
    true_k = np.array([m.parameters["scale"][0] for m in simulation[2].models])
    true_b = np.array([m.parameters["decay"][0] for m in simulation[2].models])
    log_k_error = np.log(fitted_k / true_k)
    # reached 0.77% and 0.16 A^2
    k_spread = np.std(log_k_error)
    b_spread = np.std(fitted_b - true_b)
    assert k_spread < 0.02, f"per-still K relative error spread {k_spread:.4f}"
    assert b_spread < 0.5, f"per-still B error spread {b_spread:.3f} A^2"
