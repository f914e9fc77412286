"""Outlier rejection on hand-built groups; error model recovery on synthetic data."""

import numpy as np
import pytest

from dials_vmerge.scaling import error_model as em
from dials_vmerge.scaling import ih_table as iht
from dials_vmerge.scaling import outliers


def _one_group(intensity, weight, g):
    n = len(intensity)
    return iht.build_ih_table([np.tile([[1, 1, 1]], (n, 1))], [np.asarray(intensity, float)],
                              [1.0 / np.asarray(weight, float)], [np.asarray(weight, float)],
                              [np.asarray(g, float)])


def test_standard_rejection_hand_computed_planted_outlier():
    # four observations, unit weights and g; the last is planted 60 above the others.
    table = _one_group([100.0, 102.0, 98.0, 160.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1])
    # leave-one-out for the planted reflection: mean of the others = 100,
    # z = |160 - 100| / sqrt(1/1 + 1/3) = 60 / 1.1547 = 51.96 > 6
    # after removing it only three remain: 100, 102, 98; for 102: others mean 99,
    # z = 3 / sqrt(1 + 1/2) = 2.449 < 6 -> stop.
    mask = outliers.standard_outliers(table, zmax=6.0)
    assert mask.tolist() == [False, False, False, True]
    # with zmax above the planted z (51.96) nothing is rejected; just below it is
    assert not outliers.standard_outliers(table, zmax=52.0).any()
    assert outliers.standard_outliers(table, zmax=51.9).tolist() == [False] * 3 + [True]


def test_standard_rejection_one_per_group_per_round_and_n_greater_than_two():
    # two planted outliers in a group of six: removed one after the other
    table = _one_group([10, 10.5, 9.5, 10, 40, 60], [4.0] * 6, [1.0] * 6)
    assert outliers.standard_outliers(table, zmax=6.0).tolist() == [False] * 4 + [True, True]
    # groups of two are never examined
    pair = _one_group([10.0, 1000.0], [1.0, 1.0], [1.0, 1.0])
    assert not outliers.standard_outliers(pair, zmax=6.0).any()


def test_weights_capped_at_ten_times_group_median():
    table = _one_group([1, 2, 3, 4, 5], [1.0, 1.0, 1.0, 2.0, 500.0], [1] * 5)
    assert outliers.capped_weights(table).tolist() == [1.0, 1.0, 1.0, 2.0, 10.0]


def test_simple_rejection_hand_computed():
    # I = 10, 10, 10, 30 with w = 1, g = 1: Ih = 15, sum w g^2 = 4,
    # z_4 = |30 - 15| / sqrt(1 + (1/4)^2) = 15 / 1.0308 = 14.55; z_1..3 = 5 / 1.0308 = 4.85
    table = _one_group([10.0, 10.0, 10.0, 30.0], [1.0] * 4, [1.0] * 4)
    assert outliers.simple_outliers(table, zmax=6.0).tolist() == [False, False, False, True]
    assert outliers.simple_outliers(table, zmax=4.8).all()
    assert not outliers.simple_outliers(table, zmax=14.6).any()


MULTIPLICITY = 6
# DIALS normalises deviations with sqrt((n-1)/n) where the variance of I - <I> needs
# sqrt(n/(n-1)) (error_model.calc_deltahl), so its a is the true a times (n-1)/n when all
# members of a group have equal weights, as below; we reproduce DIALS.
A_BIAS = (MULTIPLICITY - 1) / MULTIPLICITY


def _synthetic_error_model_data(a_true, b_true, seed=11, n_groups=2500):
    rng = np.random.default_rng(seed)
    mult = np.full(n_groups, MULTIPLICITY)
    j = rng.exponential(2000.0, n_groups) + 50.0
    group = np.repeat(np.arange(n_groups), mult)
    n = group.size
    g = rng.uniform(0.6, 1.4, n_groups)[group]
    expected = g * j[group]
    variance = expected + 30.0  # what integration would report
    sd_true = a_true * np.sqrt(variance + (b_true * expected) ** 2)
    intensity = expected + rng.normal(size=n) * sd_true
    hkl = np.stack([group + 1, np.zeros(n, int), np.zeros(n, int)], axis=1)
    return hkl, intensity, variance, g


def test_error_model_recovers_known_a_and_b():
    a_true, b_true = 1.6, 0.04
    hkl, intensity, variance, g = _synthetic_error_model_data(a_true, b_true)
    model = em.refine_error_model([hkl], [intensity], [variance], [g], deviation="dials")
    # a is set by the bulk of the deviations; b by the strong bins only, so looser
    assert model.a == pytest.approx(a_true * A_BIAS, rel=0.05)
    assert model.b == pytest.approx(b_true, rel=0.25)


def test_error_model_without_extra_error_gives_a_near_one_b_small():
    hkl, intensity, variance, g = _synthetic_error_model_data(1.0, 0.0, seed=12)
    model = em.refine_error_model([hkl], [intensity], [variance], [g], deviation="dials")
    assert model.a == pytest.approx(A_BIAS, rel=0.05)
    assert model.b < 0.01


def test_error_model_fixed_parameters_and_too_few_reflections():
    hkl, intensity, variance, g = _synthetic_error_model_data(1.6, 0.04)
    model = em.refine_error_model([hkl], [intensity], [variance], [g], fixed_b=0.04,
                                  deviation="dials")
    assert model.b == 0.04
    assert model.a == pytest.approx(1.6 * A_BIAS, rel=0.05)
    with pytest.raises(em.ErrorModelError):
        em.refine_error_model([hkl[:100]], [intensity[:100]], [variance[:100]], [g[:100]])


def test_error_model_grouping():
    assert em.error_model_groups(3, "combined") == [[0, 1, 2]]
    assert em.error_model_groups(3, "individual") == [[0], [1], [2]]
    assert em.error_model_groups(4, "grouped", [[1, 2]]) == [[0, 1], [2, 3]]


def test_unbiased_deviations_recover_the_true_a():
    """deviation="unbiased" normalises by sqrt(n/(n-1)): correct sigmas give a = 1 and an
    inflated error model is recovered without DIALS's (n-1)/n bias."""
    hkl, intensity, variance, g = _synthetic_error_model_data(1.0, 0.0, seed=12)
    model = em.refine_error_model([hkl], [intensity], [variance], [g], deviation="unbiased")
    assert model.a == pytest.approx(1.0, rel=0.05)
    assert model.b < 0.01
    hkl, intensity, variance, g = _synthetic_error_model_data(1.6, 0.04)
    model = em.refine_error_model([hkl], [intensity], [variance], [g], deviation="unbiased")
    assert model.a == pytest.approx(1.6, rel=0.05)
    assert model.b == pytest.approx(0.04, rel=0.25)
