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


def _likelihood_data(seed=7, n=6000):
    rng = np.random.default_rng(seed)
    group = np.sort(rng.integers(0, n // 4, n))
    intensity = rng.gamma(2.0, 300.0, n) + 1.0
    variance = intensity + rng.uniform(10, 100, n)
    g = rng.uniform(0.5, 2.0, n)
    weight = 1.0 / variance
    u = weight * g * g
    share = u / np.bincount(group, u)[group]
    with np.errstate(invalid="ignore"):  # group numbers no observation drew: 0/0, unused
        ih = np.bincount(group, weight * g * intensity) / np.bincount(group, u)
    data = em.ErrorModelData(intensity, variance, g, ih[group], None, None, None, 0,
                             weight_share=share, group=group)
    return data


def _numpy_refine_maximum_likelihood(data, fixed_a=None):
    """The likelihood refinement written with numpy alone (its form before the kernel)."""
    intensity, variance, g, share = data.intensity, data.variance, data.g, data.weight_share
    residual_sq = (intensity / g - data.ih) ** 2
    n_groups = int(data.group.max()) + 1

    def a_sq_and_cost(b):
        q = (variance + (b * intensity) ** 2) / (g * g)
        spread = np.bincount(data.group, share * share * q, minlength=n_groups)[data.group]
        unit = np.maximum(q * (1.0 - 2.0 * share) + spread, 1e-300)
        ratio = residual_sq / unit
        a_sq = float(np.mean(ratio)) if fixed_a is None else float(fixed_a) ** 2
        return a_sq, float(np.sum(np.log(a_sq * unit)) + np.sum(ratio) / a_sq)

    def f(x):
        value = a_sq_and_cost(x)[1]
        return value if np.isfinite(value) else np.inf

    lo, x, fx, hi = em._bracket_minimum(f, em.DEFAULT_B)
    b = abs(float(em._brent_minimise(f, lo, hi, x, fx)))
    return float(np.sqrt(a_sq_and_cost(b)[0])), b


def test_likelihood_kernel_gives_the_numpy_refinement():
    """The one-pass kernel of refine_maximum_likelihood (kernels/error_model_ml.py) gives the
    (a, b) of the numpy form. Not bit for bit: the kernel adds its sums in observation order
    where numpy sums pairwise, so the profile cost differs by rounding (~1e-16 relative) and
    the Brent search of b, which stops at an absolute tolerance of 1e-9, may end elsewhere
    within that tolerance: b to 1e-9 absolute (here b is ~6e-9, so relative means nothing)
    and a to 1e-7 relative allow that and nothing more."""
    data = _likelihood_data()
    for fixed_a in (None, 1.2):
        a, b = em.refine_maximum_likelihood(data, fixed_a=fixed_a)
        a_ref, b_ref = _numpy_refine_maximum_likelihood(data, fixed_a=fixed_a)
        assert abs(a - a_ref) <= 1e-7 * a_ref and abs(b - b_ref) <= 1e-9
    assert 0.0 < b < em.B_MAX


def _intensity_bins_by_full_sort(expected, n_bins=10):
    """intensity_bins as first written: the lowered edges read from a full stable sort."""
    n = expected.size
    min_per_bin = min(250 if n <= 25000 else n // 100, int(n / (3.0 * n_bins)))
    order = np.argsort(-expected, kind="stable")
    i_max, i_min = float(expected.max()), max(1.0, float(expected.min()))
    spacing = (np.log(i_max) - np.log(i_min)) / n_bins
    bounds = [i_max] + [float(np.exp(np.log(i_max) - i * spacing)) for i in range(1, n_bins + 1)]
    bounds[-1] = float(expected.min()) - 0.01
    bin_index = np.full(n, -1, dtype=np.int64)
    counts, n_cumulative = [], 0
    for i in range(n_bins):
        in_bin = (expected <= bounds[i]) & (expected > bounds[i + 1])
        if in_bin.sum() < min_per_bin and n_cumulative + min_per_bin < n:
            bounds[i + 1] = float(expected[order[n_cumulative + min_per_bin]])
            in_bin = (expected <= bounds[i]) & (expected > bounds[i + 1])
        bin_index[in_bin] = i
        counts.append(int(in_bin.sum()))
        n_cumulative += counts[-1]
    kept = [i for i, c in enumerate(counts) if c >= min_per_bin - 5]
    remap = np.full(n_bins, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    bin_index[bin_index >= 0] = remap[bin_index[bin_index >= 0]]
    return bin_index, len(kept)


def test_intensity_bins_lower_sparse_edges_as_a_full_sort_does():
    rng = np.random.default_rng(11)
    # heavy-tailed intensities with ties: the top log-spaced bins are sparse and lowered
    expected = np.round(rng.lognormal(4.0, 1.5, 60000), 1)
    bin_index, n_kept = em.intensity_bins(expected, 10)
    reference, n_reference = _intensity_bins_by_full_sort(expected, 10)
    assert n_kept == n_reference
    assert np.array_equal(bin_index, reference)
    top = bin_index == 0
    assert top.sum() >= 600  # n // 100: the first bin's edge was lowered to fill it
