"""ΔCC½ (filtering.method=deltacchalf): the one-pass leave-one-out kernel against a direct
recomputation, and the image-group layout of dials.compute_delta_cchalf."""

import numpy as np
import pytest

from dials_vmerge.scaling.delta_cc_half import cc_half_without_each_group
from dials_vmerge.scaling.filtering import DeltaCCHalfInput, image_groups


def cc_half_sigma_tau(x, unique, bin_of_unique, n_bins):
    """DIALS's compute_cchalf_from_reflection_sums written out directly: per unique
    reflection with n > 1 the mean and the variance of the mean, per bin (σy − σe)/(σy + σe)
    with σy the sample variance of the means (computed from deviations, not from sums), the
    mean over bins weighted by their number of reflections."""
    per_bin_means = [[] for _ in range(n_bins)]
    per_bin_vars = [[] for _ in range(n_bins)]
    for h in np.unique(unique):
        values = x[unique == h]
        n = len(values)
        if n > 1:
            per_bin_means[bin_of_unique[h]].append(values.mean())
            per_bin_vars[bin_of_unique[h]].append(values.var(ddof=1) / n)
    total = weight = 0.0
    for means, variances in zip(per_bin_means, per_bin_vars):
        n = len(means)
        if n > 1:
            sigma_y = np.var(means, ddof=1)
            sigma_e = np.mean(variances)
            total += n * (sigma_y - sigma_e) / (sigma_y + sigma_e)
            weight += n
    return total / weight


@pytest.fixture(scope="module")
def grouped_observations():
    """300 unique reflections over 5 bins, intensities from a Wilson-like spread, observed
    by 12 groups (about 8 observations per reflection); group 3 noisier by x5."""
    rng = np.random.default_rng(7)
    n_unique, n_bins, n_groups = 300, 5, 12
    truth = rng.exponential(1000.0, n_unique)
    bin_of_unique = rng.integers(0, n_bins, n_unique)
    unique = rng.integers(0, n_unique, 2400)
    group = rng.integers(0, n_groups, 2400)
    sigma = 0.1 * truth[unique] + 20.0
    noise = np.where(group == 3, 5.0, 1.0)
    x = truth[unique] + noise * sigma * rng.standard_normal(len(unique))
    return x, unique, group, bin_of_unique, n_groups, n_bins


def test_one_pass_kernel_equals_direct_leave_one_out(grouped_observations):
    x, unique, group, bin_of_unique, n_groups, n_bins = grouped_observations
    cc_all, cc_without = cc_half_without_each_group(x, unique, group, bin_of_unique, n_groups,
                                                    n_bins)
    np.testing.assert_allclose(cc_all, cc_half_sigma_tau(x, unique, bin_of_unique, n_bins),
                               rtol=1e-10)
    for g in range(n_groups):
        keep = group != g
        expected = cc_half_sigma_tau(x[keep], unique[keep], bin_of_unique, n_bins)
        # the kernel updates sums (Σx, Σx²) instead of recomputing: agreement to rounding
        np.testing.assert_allclose(cc_without[g], expected, rtol=1e-9, atol=1e-12)
    delta = cc_all - cc_without
    # the noisy group lowers CC½: leaving it out raises CC½ most (lowest ΔCC½)
    assert np.argmin(delta) == 3 and delta[3] < 0


def test_reflections_seen_only_by_the_left_out_group_drop_out():
    """A reflection observed twice, both times by the group left out, leaves its bin; one
    with three observations, one in the group, stays with two."""
    x = np.array([10.0, 12.0, 30.0, 33.0, 31.0, 50.0, 55.0, 70.0, 71.0])
    unique = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])
    group = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0])
    bins = np.zeros(4, dtype=np.int64)
    _, cc_without = cc_half_without_each_group(x, unique, group, bins, 2, 1)
    expected = cc_half_sigma_tau(np.array([30.0, 33.0, 50.0, 55.0, 70.0, 71.0]),
                                 np.array([1, 1, 2, 2, 3, 3]), bins, 1)
    np.testing.assert_allclose(cc_without[1], expected, rtol=1e-12)


def test_image_groups_follow_dials_layout():
    """Groups of 10 images from each dataset's first image with data; a last group shorter
    than 9 images joins the one before (dials.compute_delta_cchalf)."""
    # dataset 0: images 1-25, starts 1, 11, 21; 25 - 21 = 4 < 9: 21-25 joins 11-20
    # dataset 4: images 3-31, starts 3, 13, 23; 31 - 23 = 8 < 9: 23-31 joins 13-22
    # dataset 7: images 5-34, starts 5, 15, 25; 34 - 25 = 9: three groups
    image = np.r_[np.arange(1, 26), np.arange(3, 32), np.arange(5, 35)]
    dataset = np.r_[np.zeros(25, int), np.full(29, 4), np.full(30, 7)]
    data = DeltaCCHalfInput(np.ones(len(image)), dataset, image, np.zeros(len(image), int),
                            np.zeros(1, int), 0)
    groups = image_groups(data, 10)
    assert groups.dataset.tolist() == [0, 0, 4, 4, 7, 7, 7]
    assert groups.image_range.tolist() == [[1, 10], [11, 25], [3, 12], [13, 31], [5, 14],
                                           [15, 24], [25, 34]]
    # every row lies in its group's image range and dataset
    lo, hi = groups.image_range[groups.of_row].T
    assert np.all((image >= lo) & (image <= hi))
    assert np.array_equal(groups.dataset[groups.of_row], dataset)
