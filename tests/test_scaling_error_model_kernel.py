"""The numba b-functional equals the numpy definition (normalised deviations, bin variances)."""

import numpy as np

from dials_vmerge.scaling import error_model as em


def test_b_functional_kernel_equals_numpy_definition():
    rng = np.random.default_rng(5)
    n = 5000
    intensity = rng.gamma(2.0, 500.0, n) + 1.0
    variance = intensity + rng.uniform(10, 100, n)
    g = rng.uniform(0.5, 2.0, n)
    n_h = rng.integers(2, 9, n).astype(float)
    ih = intensity / g * rng.normal(1.0, 0.05, n)
    expected = ih * g
    bin_index, n_bins = em.intensity_bins(expected, 10)
    data = em.ErrorModelData(intensity, variance, g, ih, n_h, expected, bin_index, n_bins)
    for a, b in ((1.0, 0.02), (1.3, 0.05), (0.8, 0.0)):
        v, w = em.bin_variances(data, em.normalised_deviations(data, a, b))
        reference = float(np.sum(w * ((0.5 - v) ** 2 + 1.0 / v - 1.25)) / np.sum(w))
        assert em.b_functional(data, a, b) == reference
