"""Gaussian smoother and parameter spacing: hand-computed cases (dials-scaling.md 4.2, 4.3)."""

import math

import dials_vmerge  # noqa: F401  (import order: cctbx before numba/scipy)
import numpy as np
import pytest

from dials_vmerge.model.smoother import (
    Smoother1D,
    Smoother2D,
    Smoother3D,
    calc_n_param_from_bins,
    initialise_smooth_input,
    smoother_coordinates,
)
from dials_vmerge.kernels.smoother_weights import iround


def gauss(dz, sigma):
    return math.exp(-((dz / sigma) ** 2))


def dense(weights, index, n_par):
    out = np.zeros((weights.shape[0], n_par))
    for r in range(weights.shape[0]):
        for w, i in zip(weights[r], index[r]):
            out[r, i] += w
    return out


def test_boost_iround_is_half_away_from_zero():
    assert [iround(v) for v in (-1.5, -0.5, -0.49, 0.49, 0.5, 1.5, 2.5, -2.5)] == [
        -2, -1, 0, 0, 1, 2, 3, -3,
    ]


def test_two_parameters_sigma_065_all_points():
    # data span [0, 1]: one interval, positions 0 and 1, sigma 0.65
    x = np.array([0.0, 0.3, 1.0])
    sm = Smoother1D(x, 2)
    p = np.array([2.0, 5.0])
    w0, w1 = gauss(0.3, 0.65), gauss(0.7, 0.65)
    expected = (2.0 * w0 + 5.0 * w1) / (w0 + w1)
    assert sm.value(p)[1] == pytest.approx(expected, rel=1e-14)
    d = dense(sm.weights, sm.index, 2)
    assert d[1] == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)], rel=1e-14)
    # the end points are pulled towards, not onto, their parameter
    w0e, w1e = 1.0, gauss(1.0, 0.65)
    assert sm.value(p)[0] == pytest.approx((2.0 * w0e + 5.0 * w1e) / (w0e + w1e), rel=1e-14)


def test_three_parameters_span_two_sigma_070():
    # span 2 -> two intervals of 1, positions 0, 1, 2, all three always contribute
    x = np.array([0.0, 0.5, 2.0])
    sm = Smoother1D(x, 3)
    p = np.array([1.0, -1.0, 3.0])
    w = [gauss(0.5 - k, 0.7) for k in range(3)]
    assert sm.value(p)[1] == pytest.approx(sum(a * b for a, b in zip(w, p)) / sum(w), rel=1e-14)


def test_five_parameters_half_offset_positions_and_iround_neighbourhood():
    # span 3 -> n_intervals 3, N = 5, positions -0.5, 0.5, 1.5, 2.5, 3.5; sigma 0.7
    x = np.array([0.0, 1.2, 2.0, 3.0])
    sm = Smoother1D(x, 5)
    p = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    pos = [-0.5, 0.5, 1.5, 2.5, 3.5]

    def smooth(z, idx):
        w = [gauss(z - pos[i], 0.7) for i in idx]
        return sum(wi * p[i] for wi, i in zip(w, idx)) / sum(w)

    values = sm.value(p)
    # z = 0: iround(-1.5) = -2 -> i1 = -1 -> clamped to [0, 2): only two parameters
    assert values[0] == pytest.approx(smooth(0.0, [0, 1]), rel=1e-14)
    # z = 1.2: iround(-0.3) = 0 -> parameters 1, 2, 3
    assert values[1] == pytest.approx(smooth(1.2, [1, 2, 3]), rel=1e-14)
    # z = 2.0: iround(0.5) = 1 (half away from zero) -> parameters 2, 3, 4
    assert values[2] == pytest.approx(smooth(2.0, [2, 3, 4]), rel=1e-14)
    # z = 3.0: i1 = 3, i2 = 6 > 5 -> [3, 5): two parameters
    assert values[3] == pytest.approx(smooth(3.0, [3, 4]), rel=1e-14)
    assert set(sm.index[0]) == {0, 1} and sm.weights[0, 2] == 0.0


def test_coordinates_shift_to_minimum_and_ceil_range():
    # min subtracted, range [0, ceil(max)] = [0, 4] with N = 6 -> 4 intervals of 1
    z = smoother_coordinates(np.array([10.2, 11.0, 13.9]), 6)
    assert z == pytest.approx([0.0, 0.8, 3.7], abs=1e-12)
    # N = 2 over a span of 2.5: range [0, 3], one interval of 3
    z = smoother_coordinates(np.array([1.0, 3.5]), 2)
    assert z == pytest.approx([0.0, 2.5 / 3.0], abs=1e-15)
    # a span below 1 still uses the range [0, 1]
    z = smoother_coordinates(np.array([5.0, 5.25]), 2)
    assert z == pytest.approx([0.0, 0.25], abs=1e-15)


def test_2d_smoother_euclidean_weights_x_fastest():
    # x: N = 2 (positions 0, 1), y: N = 5 (positions -0.5 ... 3.5); sigma from min n_avg = 2
    x = np.array([0.0, 0.25, 1.0])
    y = np.array([0.0, 1.2, 3.0])
    sm = Smoother2D(x, y, 2, 5)
    p = np.arange(10, dtype=float) + 1.0
    ypos = [-0.5, 0.5, 1.5, 2.5, 3.5]
    zx, zy = 0.25, 1.2
    num = den = 0.0
    for i in (0, 1):
        for j in (1, 2, 3):
            w = math.exp(-((zx - i) ** 2 + (zy - ypos[j]) ** 2) / 0.65**2)
            num += w * p[i + 2 * j]
            den += w
    assert sm.value(p)[1] == pytest.approx(num / den, rel=1e-13)


def test_3d_smoother_matches_hand_sum():
    x = np.array([0.0, 0.6, 2.0])
    y = np.array([0.0, 0.5, 1.0])
    z = np.array([0.0, 2.2, 4.0])
    sm = Smoother3D(x, y, z, 3, 2, 6)  # spans 2, 1, 4 -> spacing 1 on every axis
    p = np.linspace(0.5, 2.0, 36)
    zpos = [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]
    num = den = 0.0
    for i in range(3):
        for j in range(2):
            for k in (2, 3, 4):  # iround(2.2 - 1.5) + 1 = 2
                w = math.exp(-((0.6 - i) ** 2 + (0.5 - j) ** 2 + (2.2 - zpos[k]) ** 2) / 0.65**2)
                num += w * p[i + 3 * j + 6 * k]
                den += w
    assert sm.value(p)[1] == pytest.approx(num / den, rel=1e-13)
    assert sm.weights.shape == (3, 27) and sm.index.dtype == np.int32


def test_weights_are_the_derivative():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 7, 50)
    sm = Smoother1D(x, 9)
    p = rng.normal(1, 0.2, 9)
    d = dense(sm.weights, sm.index, 9)
    assert np.allclose(d.sum(axis=1), 1.0, atol=1e-14)
    h = 1e-6
    for j in range(9):
        dp = np.zeros(9)
        dp[j] = h
        fd = (sm.value(p + dp) - sm.value(p - dp)) / (2 * h)
        assert np.allclose(fd, d[:, j], atol=1e-9)


@pytest.mark.parametrize(
    "osc_range, width, interval, n_param, spacing, norm_fac",
    [
        # quartz: 100 deg at 1 deg/image (values written by DIALS in scaled.expt)
        ((-50.0, 50.0), 1.0, 15.0, 9, 14.285714285714286, 0.06992999999999999),
        ((-50.0, 50.0), 1.0, 20.0, 7, 20.0, 0.04995),
        # insulin: 45 deg at 1 deg/image, auto intervals 8 and 10
        ((0.0, 45.0), 1.0, 8.0, 8, 7.5, 0.1332),
        ((0.0, 45.0), 1.0, 10.0, 7, 9.0, 0.111),
        # l-cysteine: 170 deg at 0.1 deg/image, intervals 15 and 20
        ((0.0, 170.0), 0.1, 15.0, 14, 170.0 / 12, 0.999 * 0.1 * 12 / 170.0),
        ((0.0, 170.0), 0.1, 20.0, 11, 170.0 / 9, 0.999 * 0.1 * 9 / 170.0),
        # short sweeps: N = 2 (span <= interval) and N = 3 (span < 2 intervals)
        ((0.0, 10.0), 0.5, 10.0, 2, 10.0, 0.999 * 0.5 / 10.0),
        ((0.0, 15.0), 0.5, 10.0, 3, 7.5, 0.999 * 0.5 / 7.5),
        # exactly two intervals: the +1e-5 keeps N = 3 instead of 5
        ((0.0, 20.0), 1.0, 10.0, 3, 10.0, 0.0999),
    ],
)
def test_initialise_smooth_input(osc_range, width, interval, n_param, spacing, norm_fac):
    n, nf, sp = initialise_smooth_input(osc_range, width, interval)
    assert n == n_param
    assert sp == pytest.approx(spacing, rel=1e-15)
    assert nf == pytest.approx(norm_fac, rel=1e-15)


def test_calc_n_param_from_bins():
    assert calc_n_param_from_bins(0.0, 3.0, 1) == (2, 3.0)
    assert calc_n_param_from_bins(0.0, 3.0, 2) == (3, 1.5)
    assert calc_n_param_from_bins(0.0, 3.0, 3) == (5, 1.0)
