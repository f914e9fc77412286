"""Truth recovery of the flat engine at many datasets (issue 10, test 3): 2000 KB stills and
50 narrow physical wedges, judged as tests/test_truth_recovery.py judges 40 stills and two
sweeps (same error measure, same 2% limit). Slow: run with `pytest -m slow`."""

import numpy as np
import pytest

from dials_vmerge.simulate import simulate_rotation, simulate_stills

from test_truth_recovery import (remove_global_k_and_b, rms_relative, scale_simulation,
                                 scaled_rows)


@pytest.mark.slow
def test_kb_2000_stills():
    simulation = simulate_stills(n_stills=2000, seed=3, mean_i_over_sigma=10.0)
    experiments, table, true_g = scale_simulation(simulation, "model=KB")
    assert len(experiments) == 2000
    scaled, log_ratio, d, _ = scaled_rows(experiments, table, true_g)
    assert len(np.unique(table["id"][scaled])) == 2000
    residual, (log_k, b) = remove_global_k_and_b(log_ratio, d)
    error = rms_relative(residual)
    assert error < 0.02, f"2000 KB stills: RMS relative error of g {error:.4f}"
    fitted_k = np.array([e.scaling_model["scale"]["parameters"][0] for e in experiments])
    true_k = np.array([m.parameters["scale"][0] for m in simulation[2].models])
    k_spread = np.std(np.log(fitted_k / true_k))
    assert k_spread < 0.02, f"per-still K relative error spread {k_spread:.4f}"


@pytest.mark.slow
def test_physical_50_narrow_wedges():
    # 50 wedges of 10 images x 0.5 degrees (5 degrees each, no absorption by DIALS's rule)
    simulation = simulate_rotation(n_obs_target=150_000, n_sweeps=50, n_images=10,
                                   model="physical", seed=4, mean_i_over_sigma=10.0)
    experiments, table, true_g = scale_simulation(simulation, "model=physical")
    assert len(experiments) == 50
    scaled, log_ratio, d, _ = scaled_rows(experiments, table, true_g)
    residual, (log_k, b) = remove_global_k_and_b(log_ratio, d)
    error = rms_relative(residual)
    assert error < 0.02, f"50 physical wedges: RMS relative error of g {error:.4f}"
