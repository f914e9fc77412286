"""The basic error model inside the marginal likelihood (issue 14, test 1 with
scaling_options.target=likelihood; scaling/likelihood.py).

With target=likelihood, a and b are parameters of -2 log p(I | theta, a, b), fitted by
maximum likelihood at the run's error-model steps, alternating with the rounds of theta (not
by the deviations fit of error_model.py). The simulator inflates the true noise to a^2 (sigma^2 +
(b I)^2) with I the expected intensity while reporting sigma, so a and b are known; the
merged sigmas are compared with the truth as in test_error_model_calibration.py.

Reached (seed 7, 60 000 observations, two sweeps, physical model, mean I/sigma 20):
  a, b = 1.0, 0    -> 0.989, 0.0018; merged SD 1.020
  a, b = 1.5, 0    -> 1.487, 0.0012; merged SD 1.016
  a, b = 1.0, 0.03 -> 0.991, 0.0299; merged SD 1.029
  a, b = 1.5, 0.03 -> 1.487, 0.0300; merged SD 1.028
Fitted on all groups (with a, b refitted at every E-step, I(+) and I(-) together) instead
of those with mean g E[J] > min_Ih (25), a came out 3-7% low
(1.389 at a = 1.5): the simulated sigmas of weak reflections are estimated from the observed
counts, clipped at zero, which overstates them, as in real data; DIALS's min_Ih cut has the
same reason.
"""

import copy

import pytest

from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.merging.api import merge_scaled_table
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.simulate import simulate_rotation
from dials_vmerge.simulate.compare import compare_with_truth

from test_error_model_calibration import B_ZERO_TOLERANCE, LOG, ORTHORHOMBIC, vmerge_params

LIKELIHOOD = "scaling_options.target=likelihood"


def _scale_and_merge_strong(a_true, b_true, seed=7, n_obs=60_000):
    """test_error_model_calibration's run at mean I/sigma 20 (not 10), with the likelihood.

    b is measured by the reflections where b I is comparable to sigma (I/sigma >~ 1/b = 33).
    At mean I/sigma 10 the Fisher SE of b is 0.00075 (2.5% of 0.03) and scale errors the
    model leaves, which add variance in proportion to I^2 as b does, moved b between 0.0283
    (60 000 observations) and 0.0320 (120 000), a = 1.505 / 1.479: a 5% test there would
    measure luck (least squares' deviations fit: 0.0300 / 0.0291 on the same data). At mean
    I/sigma 20 the SE is 0.00046 (1.5%)."""
    experiments_dict, table, truth = simulate_rotation(
        n_obs_target=n_obs, n_sweeps=2, model="physical", seed=seed, multiplicity=6.5,
        mean_i_over_sigma=20.0, error_model_a=a_true, error_model_b=b_true, **ORTHORHOMBIC)
    error_model, comparison = _run((experiments_dict, table, truth), LIKELIHOOD)
    return error_model, comparison


@pytest.mark.parametrize("a_true, b_true", [
    (1.0, 0.0),
    pytest.param(1.5, 0.0, marks=pytest.mark.slow),  # 4 runs ~1-2 min on 2 busy cores
    pytest.param(1.0, 0.03, marks=pytest.mark.slow),
    (1.5, 0.03)])
def test_likelihood_recovers_error_model_and_calibrates_merged_sigmas(a_true, b_true):
    # b = 0 is checked against an absolute bound (B_ZERO_TOLERANCE = 0.005, a sixth of the
    # b = 0.03 recovered): "within 5%" of 0 would be no tolerance at all.
    (a, b), comparison = _scale_and_merge_strong(a_true, b_true)
    assert a == pytest.approx(a_true, rel=0.05), (a, b)
    if b_true == 0.0:
        assert b < B_ZERO_TOLERANCE, (a, b)
    else:
        assert b == pytest.approx(b_true, rel=0.05), (a, b)
    assert 0.95 <= comparison.calibration_sd <= 1.10, comparison


def _run(simulation, *args):
    experiments_dict, table, truth = simulation
    params = vmerge_params(*args)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    experiments, scaled, summary = run_scaling_job(params, experiments, table.copy(), LOG)
    merged = merge_scaled_table(scaled, experiments, params).merged
    comparison = compare_with_truth(merged.asu_index, merged.intensity, merged.sigma,
                                    merged.dstar_sq, truth.miller_index, truth.intensity)
    return summary["datasets"][0]["error_model"], comparison


@pytest.mark.parametrize("model, simulated", [("KB", "KB"), ("dose_decay", "physical")])
def test_likelihood_target_on_each_model(model, simulated):
    """The KB and dose_decay models under the likelihood target (physical: the tests above;
    array: test_scaling_likelihood.py, slow). dose_decay is scaled on physical-model data (the
    simulator has no dose model). Reached (20 000 observations, seed 11, a = 1.3, b = 0.02):
      KB         least squares 0.02656, a 1.277; likelihood 0.02655, a 1.281, SD 0.993
      dose_decay least squares 0.02749, a 1.280; likelihood 0.02750, a 1.291, SD 1.045
    Before the acentric tail was written without cancellation, dose_decay's likelihood
    scales ran to g = 0 and the run failed."""
    simulation = simulate_rotation(n_obs_target=20_000, n_sweeps=2, model=simulated, seed=11,
                                   multiplicity=6.5, mean_i_over_sigma=10.0,
                                   error_model_a=1.3, error_model_b=0.02, **ORTHORHOMBIC)
    _, least_squares = _run(simulation, f"model={model}")
    (a, b), likelihood = _run(simulation, f"model={model}", LIKELIHOOD)
    assert likelihood.relative_error <= 1.01 * least_squares.relative_error, (
        likelihood, least_squares)
    assert a == pytest.approx(1.3, rel=0.05), (a, b)
    assert 0.95 <= likelihood.calibration_sd <= 1.10, likelihood
