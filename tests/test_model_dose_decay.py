"""model=dose_decay (issue 16, test 1; dials-scaling.md 2.1, 4.9, 4.10).

- evaluation against numbers computed by hand from g = S * exp(C z / d^n) * exp(B / 2d^2);
- the DIALS JSON layout: component blocks in DIALS's constructor order (scale, decay,
  relative_B), the configdict keys in DIALS's from_data order, written out here from the DIALS
  source (model.py DoseDecay.from_data), and a byte-equal round trip;
- truth recovery on a simulation whose radiation damage follows the model (one dose rate for
  all sweeps, a relative B per sweep): g to < 2% after removing a global K and B, the shared
  dose rate itself to < 2%, and a rerun that starts from the stored models.
"""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from dials_vmerge.model.dose_decay import DoseDecayScalingModel
from dials_vmerge.model.factory import create_scaling_model, default_model_params, model_from_dict
from dials_vmerge.scaling.parameters import ParameterManager
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from test_truth_recovery import (LOG, ORTHORHOMBIC, remove_global_k_and_b, rms_relative,
                                 scale_simulation, scaled_rows, scaling_params)


def model_dict(scale, dose_rate, relative_b, resolution_dependence="quadratic"):
    return {
        "__id__": "dose_decay",
        "scale": {"n_parameters": len(scale), "parameters": list(scale),
                  "null_parameter_value": 1.0},
        "decay": {"n_parameters": 1, "parameters": [dose_rate], "null_parameter_value": 0.0},
        "relative_B": {"n_parameters": 1, "parameters": [relative_b],
                       "null_parameter_value": 0.0},
        "configuration_parameters": {
            "corrections": ["scale", "relative_B", "decay"],
            "valid_osc_range": [0.0, 20.0], "shared": ["decay"],
            "s_norm_fac": 0.0999, "scale_rot_interval": 2.0,
            "resolution_dependence": resolution_dependence,
            "valid_image_range": [1, 20]},
    }


ROWS = {"xyzobs.px.value": np.array([[0, 0, 0.5], [0, 0, 10.0], [0, 0, 19.5]]),
        "d": np.array([1.5, 2.0, 4.0])}


def configured(d):
    model = model_from_dict(copy.deepcopy(d))
    assert isinstance(model, DoseDecayScalingModel)
    model.configure(ROWS, experiment=None)
    return model


@pytest.mark.parametrize("dependence, power", [("quadratic", 2), ("linear", 1)])
def test_evaluation_against_hand_computed_values(dependence, power):
    # Constant scale parameters: the normalised Gaussian smoother then gives exactly 1.3.
    model = configured(model_dict([1.3] * 12, -0.01, 1.0, dependence))
    g, deriv, index = model.evaluate()
    if power == 2:
        # z/d^2 = 0.5/2.25, 10/4, 19.5/16; B/(2d^2) = 1/4.5, 1/8, 1/32
        expected = [1.3 * math.exp(-0.01 * 0.5 / 2.25 + 1 / 4.5),
                    1.3 * math.exp(-0.025 + 0.125),
                    1.3 * math.exp(-0.01 * 19.5 / 16 + 1 / 32)]
    else:
        expected = [1.3 * math.exp(-0.01 * 0.5 / 1.5 + 1 / 4.5),
                    1.3 * math.exp(-0.05 + 0.125),
                    1.3 * math.exp(-0.01 * 19.5 / 4 + 1 / 32)]
    assert g == pytest.approx(expected, rel=1e-12)
    assert g[1] == pytest.approx(1.4367221934983, rel=1e-12) if power == 2 else True
    z, d = ROWS["xyzobs.px.value"][:, 2], ROWS["d"]
    full = np.zeros((3, model.n_parameters))
    for r in range(3):
        np.add.at(full[r], index[r], deriv[r])
    slices = model.parameter_slices()
    assert list(slices) == ["scale", "decay", "relative_B"]
    assert full[:, slices["decay"].start] == pytest.approx(g * z / d ** power, rel=1e-12)
    assert full[:, slices["relative_B"].start] == pytest.approx(g / (2 * d ** 2), rel=1e-12)
    # g is linear in the scale parameters: sum_j p_j dg/dp_j = g
    assert full[:, slices["scale"]] @ np.full(12, 1.3) == pytest.approx(g, rel=1e-12)


def test_derivatives_match_finite_differences():
    rng = np.random.default_rng(1)
    model = configured(model_dict(1 + 0.2 * rng.standard_normal(12), -0.02, 0.7))
    p0 = model.parameter_vector()
    g, deriv, index = model.evaluate()
    analytic = np.zeros((3, p0.size))
    for r in range(3):
        np.add.at(analytic[r], index[r], deriv[r])
    numeric = np.zeros_like(analytic)
    for j in range(p0.size):
        step = 1e-6
        plus, minus = p0.copy(), p0.copy()
        plus[j] += step
        minus[j] -= step
        model.set_parameter_vector(plus)
        g_plus = model.evaluate_g()
        model.set_parameter_vector(minus)
        numeric[:, j] = (g_plus - model.evaluate_g()) / (2 * step)
    assert np.allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def experiment_90_degrees():
    return SimpleNamespace(scan={"image_range": [1, 90], "oscillation": [0.0, 1.0]},
                           is_still=False)


def test_new_model_has_the_dials_layout_and_round_trips():
    experiment = experiment_90_degrees()
    params = default_model_params(model="dose_decay")
    model = create_scaling_model(params, experiment, None)
    model.set_valid_image_range(1, 90)
    d = model.to_dict()
    # DIALS DoseDecay.from_data for a 90-degree scan of 1-degree images, default options:
    # initialise_smooth_input(90, 1.0, 2.0): int(90 / 2.00001) + 1 = 45 bins, 47 parameters,
    # spacing 2.0, norm_fac 0.999 * 1.0 / 2.0.
    expected = {
        "__id__": "dose_decay",
        "scale": {"n_parameters": 47, "parameters": [1.0] * 47, "null_parameter_value": 1.0},
        "decay": {"n_parameters": 1, "parameters": [0.0], "null_parameter_value": 0.0},
        "relative_B": {"n_parameters": 1, "parameters": [0.0], "null_parameter_value": 0.0},
        "configuration_parameters": {
            "corrections": ["scale", "relative_B", "decay"],
            "valid_osc_range": [0.0, 90.0],
            "shared": ["decay"],
            "s_norm_fac": 0.4995,
            "scale_rot_interval": 2.0,
            "resolution_dependence": "quadratic",
            "valid_image_range": [1, 90]},
    }
    assert json.dumps(d) == json.dumps(expected)  # key order included
    assert model.consecutive_refinement_order == [["scale", "relative_B", "decay"],
                                                  ["absorption"]]
    # with ESDs, through JSON text and back: identical text
    model.set_est_standard_devs(np.linspace(0.0, 0.1, model.n_parameters))
    text = json.dumps(model.to_dict())
    assert json.dumps(model_from_dict(json.loads(text)).to_dict()) == text


def test_options_absorption_linear_unshared_and_fixed():
    params = default_model_params(model="dose_decay", dose_decay__absorption_correction=True,
                                  dose_decay__resolution_dependence="linear",
                                  dose_decay__relative_B_correction=False)
    params.dose_decay.share.decay = False
    params.dose_decay.correction.fix = ["decay"]
    model = create_scaling_model(params, experiment_90_degrees(), None)
    d = model.to_dict()
    assert list(d) == ["__id__", "scale", "decay", "absorption", "configuration_parameters"]
    conf = d["configuration_parameters"]
    assert conf["corrections"] == ["scale", "decay", "absorption"]
    assert "shared" not in conf
    assert conf["resolution_dependence"] == "linear"
    assert (conf["lmax"], conf["abs_surface_weight"]) == (4, 1e6)
    assert d["absorption"]["n_parameters"] == 24
    # the restraint: only the absorption surface, weight 1e6
    weights = model.restraint_weights()
    assert weights[model.parameter_slices()["absorption"]] == pytest.approx([1e6] * 24)
    assert not weights[:48].any()
    assert model.shared_component() is None
    assert not model.free_parameter_mask()[model.parameter_slices()["decay"]].any()


def test_shared_dose_rate_gets_one_column():
    params = default_model_params(model="dose_decay")
    models = [create_scaling_model(params, experiment_90_degrees(), None) for _ in range(3)]
    manager = ParameterManager(models)
    # 47 scale + 1 relative B per sweep, one dose rate for all
    assert manager.n_free == 3 * 48 + 1
    decay_columns = {int(manager.column_of_parameter[i][47]) for i in range(3)}
    assert len(decay_columns) == 1


@pytest.fixture(scope="module")
def damage_simulation():
    from dials_vmerge.simulate import simulate_rotation

    return simulate_rotation(n_obs_target=30_000, n_sweeps=3, model="dose_decay", seed=4,
                             multiplicity=6.5, mean_i_over_sigma=10.0, dose_b_per_sweep=8.0,
                             **ORTHORHOMBIC)


def test_truth_recovery_with_radiation_damage(damage_simulation):
    _, _, truth = damage_simulation
    true_rate = truth.models[0].parameters["decay"][0]
    assert all(m.parameters["decay"][0] == true_rate for m in truth.models)
    experiments, table, true_g = scale_simulation(damage_simulation, "model=dose_decay")
    scaled, log_ratio, d, asu = scaled_rows(experiments, table, true_g)
    residual, (log_k, b) = remove_global_k_and_b(log_ratio, d)
    error = rms_relative(residual)
    # reached 0.45% (3 sweeps of 115 images, 0.5 degrees; 8 A^2 of damage per sweep)
    assert error < 0.02, f"dose_decay: RMS relative error of g {error:.4f}"
    assert rms_relative(log_ratio - log_ratio.mean()) > 2 * error
    rates = [e.scaling_model["decay"]["parameters"][0] for e in experiments]
    assert len(set(rates)) == 1  # shared
    assert rates[0] == pytest.approx(true_rate, rel=0.02)  # reached 0.3%
    # relative B: the truth up to the one global B removed above
    fitted_b = np.array([e.scaling_model["relative_B"]["parameters"][0] for e in experiments])
    true_b = np.array([m.parameters["relative_B"][0] for m in truth.models])
    assert np.ptp(fitted_b - true_b) < 0.3
    # Rescaling from the stored models: the models are reloaded (same layout), not remade.
    experiments_dict, original, _ = damage_simulation
    rerun = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    for e_new, e in zip(rerun, experiments):
        e_new.scaling_model = copy.deepcopy(e.scaling_model)
    table_2 = original.copy()
    table_2["truth_row"] = np.arange(table_2.nrows, dtype=np.uint64)
    experiments_2, table_2, _ = run_scaling_job(scaling_params(), rerun, table_2, LOG)
    true_g_2 = truth.inverse_scale_factor[table_2["truth_row"].astype(np.int64)]
    scaled_2, log_ratio_2, d_2, _ = scaled_rows(experiments_2, table_2, true_g_2)
    assert rms_relative(remove_global_k_and_b(log_ratio_2, d_2)[0]) < 0.02
    # no model= given: the stored dose_decay models are used as they are
    assert [e.scaling_model["__id__"] for e in experiments_2] == ["dose_decay"] * 3
    assert [e.scaling_model["scale"]["n_parameters"] for e in experiments_2] == \
        [e.scaling_model["scale"]["n_parameters"] for e in experiments]


def test_limit_image_range_drops_scale_parameters_as_dials():
    model = create_scaling_model(default_model_params(model="dose_decay"),
                                 experiment_90_degrees(), None)
    model.set_valid_image_range(1, 90)
    scale = np.arange(47, dtype=float)
    model.components["scale"].set_parameters(scale)
    model.components["decay"].set_parameters([-0.02])
    model.limit_image_range(11, 90)
    conf = model.configdict
    # 80 degrees at the stored 2-degree spacing: int(80 / 2.00001) + 1 = 40 bins, 42
    # parameters; DIALS drops round(10 images * 0.4995) = 5 leading ones (4.995 -> 5).
    assert model.components["scale"].parameters.tolist() == scale[5:47].tolist()
    assert conf["valid_image_range"] == [11, 90]
    assert conf["valid_osc_range"] == pytest.approx([10.0, 90.0])
    assert conf["s_norm_fac"] == pytest.approx(0.999 * 1.0 / 2.0)
    assert model.components["decay"].parameters.tolist() == [-0.02]  # raw z: unchanged
