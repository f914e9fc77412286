"""Cross-validation (issue 16, test 4; dials-scaling.md 2.8): on data simulated with an
absorption surface, free-set Rmeas and CC1/2 prefer physical.absorption_correction=True;
the free-set folds partition the unique reflections; free reflections stay out of
minimisation; the results table has DIALS's layout."""

import copy
import logging

import iotbx.phil
import numpy as np
import pytest

from dials_vmerge.cli import load_phil_text
from dials_vmerge.cross_validation import format_results, run_cross_validation
from dials_vmerge.errors import PhilError
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.scaling.free_set import free_set_mask
from dials_vmerge.simulate import simulate_rotation

LOG = logging.getLogger("test_cross_validation")
PHIL = ["input", "model", "scaling", "compute", "output", "cross_validation"]


def master():
    return iotbx.phil.parse(load_phil_text(PHIL))


def params(*args):
    m = master()
    interpreter = m.command_line_argument_interpreter()
    return m.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


def test_folds_partition_the_unique_reflections():
    rng = np.random.default_rng(0)
    hkl = np.unique(rng.integers(-40, 41, size=(20000, 3)), axis=0)
    folds = np.array([free_set_mask(hkl, 10.0, k) for k in range(10)])
    assert np.all(folds.sum(axis=0) == 1)  # each reflection in exactly one fold
    fractions = folds.mean(axis=1)
    assert np.all(np.abs(fractions - 0.1) < 0.01), fractions
    assert np.array_equal(free_set_mask(hkl, 10.0, 13), folds[3])  # offset modulo 10
    # 20%: every fifth
    assert abs(free_set_mask(hkl, 20.0, 0).mean() - 0.2) < 0.01


@pytest.fixture(scope="module")
def absorption_data():
    # 2 sweeps of ~75 degrees (auto absorption would be on; it is compared explicitly)
    experiments, table, _ = simulate_rotation(
        n_obs_target=20_000, n_sweeps=2, model="physical", seed=5, absorption="on",
        absorption_strength=0.15, multiplicity=6.5, mean_i_over_sigma=20.0,
        space_group="P 21 21 21", unit_cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0))
    return ExperimentList.from_dict(experiments), table


def test_multi_mode_prefers_absorption_when_the_truth_has_it(absorption_data):
    experiments, table = absorption_data
    p = params("model=physical", "cross_validation.cross_validation_mode=multi",
               "cross_validation.parameter=physical.absorption_correction")
    rows, text, best = run_cross_validation(p, experiments, table, LOG, master())
    labels = [label for label, _ in rows]
    assert labels == ["physical.absorption_correction=True",
                      "physical.absorption_correction=False"]
    on, off = rows[0][1][0], rows[1][1][0]
    assert best["free Rmeas"] == labels[0] and best["free CC1/2"] == labels[0]
    assert on[1] < off[1] and on[4] > off[4]
    # reached (seed 5): free Rmeas 0.0348 with absorption, higher without; free CC1/2 higher
    assert "free Rmeas" in text and "std dev" in text and "*" in text
    # the inputs are untouched (each run scales copies)
    assert "inverse_scale_factor_variance" not in table or \
        not np.any(table["inverse_scale_factor_variance"])


def test_free_set_is_left_out_of_minimisation(absorption_data):
    from dials_vmerge.pipeline import run_scaling_job
    from dials_vmerge.scaling.ih_table import map_indices_to_asu
    from dials_vmerge.geometry import space_group

    experiments, table = absorption_data
    p = params("model=physical", "scaling_options.use_free_set=True",
               "scaling_options.free_set_offset=2", "reflection_selection.method=use_all")
    scaled_experiments, scaled, summary = run_scaling_job(
        p, copy.deepcopy(experiments), table.copy(), LOG)
    free = free_set_mask(map_indices_to_asu(scaled["miller_index"],
                                            space_group(scaled_experiments[0]), False), 10.0, 2)
    assert summary["free_set"]["offset"] == 2
    # use_all minimises on every suitable row but the free ones
    selected = sum(d["n_selected"] for d in summary["datasets"])
    suitable = sum(d["n_suitable"] for d in summary["datasets"])
    assert selected == suitable - summary["free_set"]["n_free_observations"]
    assert 0.07 < summary["free_set"]["n_free_observations"] / suitable < 0.13
    assert 0.07 < free.mean() < 0.13


def test_format_marks_the_best_and_reports_fold_spread():
    rows = [("a=1", np.array([[0.1, 0.12, 0.02, 0.99, 0.98, 0.01],
                              [0.1, 0.14, 0.04, 0.99, 0.96, 0.03]])),
            ("a=2", np.array([[0.1, 0.20, 0.10, 0.99, 0.90, 0.09],
                              [0.1, 0.20, 0.10, 0.99, 0.90, 0.09]]))]
    text, best = format_results(rows)
    assert best == {"free Rmeas": "a=1", "Rmeas gap": "a=1", "free CC1/2": "a=1",
                    "CC1/2 gap": "a=1"}
    assert "0.13000*" in text and "0.97000*" in text
    # sample standard deviation over folds (ddof 1), as DIALS
    assert f"{np.std([0.12, 0.14], ddof=1):.5f}" in text


def test_bad_parameter_is_a_clear_error(absorption_data):
    experiments, table = absorption_data
    p = params("cross_validation.cross_validation_mode=multi",
               "cross_validation.parameter=absorption_correction")
    with pytest.raises(PhilError, match="give the full path"):
        run_cross_validation(p, experiments, table, LOG, master())
    p = params("cross_validation.cross_validation_mode=multi",
               "cross_validation.parameter=physical.decay_interval")
    with pytest.raises(PhilError, match="parameter_values"):
        run_cross_validation(p, experiments, table, LOG, master())
