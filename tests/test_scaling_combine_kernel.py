"""The Imid-search kernel gives exactly the numpy recipe (combine_values, times c over g)."""

import numpy as np

from dials_vmerge.scaling import combine


def test_scaled_combined_kernel_equals_numpy_recipe():
    rng = np.random.default_rng(2)
    n = 20000
    i_sum = rng.normal(300, 600, n)
    i_prf = i_sum + rng.normal(0, 30, n)
    v_sum = np.abs(rng.normal(400, 100, n))
    v_prf = np.abs(v_sum + rng.normal(0, 50, n))
    v_prf[:50] = -1.0  # negative variances are clipped to 0 in sigma
    partiality = rng.uniform(-0.1, 1.0, n)  # p <= 0 counts as 1
    correction = rng.uniform(0.5, 2.0, n)
    g = rng.uniform(0.5, 2.0, n)
    for imid in (0.0, 1.0, 412.5, 17.0):
        i, v = combine.combine_values(i_prf, v_prf, i_sum, v_sum, partiality, imid)
        expected_i = i * correction / g
        expected_sigma = np.sqrt(np.clip(v, 0, None)) * correction / g
        scaled_i = np.empty(n)
        scaled_sigma = np.empty(n)
        weight = combine.profile_weight(i_sum, imid)
        combine.scaled_combined_kernel(i_prf, v_prf, i_sum, v_sum, partiality, correction, g,
                                       imid, weight, scaled_i, scaled_sigma)
        assert np.array_equal(scaled_i, expected_i)
        assert np.array_equal(scaled_sigma, expected_sigma)
