"""Sigma calibration report (merging/calibration.py): leave-one-out normalised deviations.

Checked against a per-group loop written here, and on the merging simulator whose sigmas are
exact: SD 1 with the true sigmas, 2 when they are halved, in every intensity and resolution
bin; the JSON of a merge carries it."""

import numpy as np
import pytest

from dials_vmerge.merging.calibration import (format_calibration, leave_one_out_deviations,
                                              sigma_calibration)
from dials_vmerge.merging.groups import Groupings

from merging_simulation import simulate


def test_leave_one_out_deviations_equal_a_loop():
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 5, 1, 4]
    group_start = np.concatenate([[0], np.cumsum(sizes)])
    x = rng.normal(100.0, 10.0, group_start[-1])
    s = rng.uniform(2.0, 20.0, group_start[-1])
    delta, others_mean, group = leave_one_out_deviations(x, s, group_start)
    expected = []
    for g, (lo, hi) in enumerate(zip(group_start[:-1], group_start[1:])):
        for i in range(lo, hi):
            others = [j for j in range(lo, hi) if j != i]
            if not others:
                continue
            w = np.array([1 / s[j] ** 2 for j in others])
            m = np.sum(w * x[others]) / np.sum(w)
            expected.append(((x[i] - m) / np.sqrt(s[i] ** 2 + 1 / np.sum(w)), m, g))
    expected = np.array(expected)
    assert np.allclose(delta, expected[:, 0], rtol=1e-12)
    assert np.allclose(others_mean, expected[:, 1], rtol=1e-12)
    assert np.array_equal(group, expected[:, 2].astype(int))


def test_leave_one_out_kernel_equals_numpy_bit_for_bit_in_any_order():
    """The kernel (reading observations through `order`) against the whole-array numpy
    formulation written here: the same values bit for bit, as np.bincount adds each group's
    terms in the same order."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 9, 3000)
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(group_start[-1])
    x = rng.normal(50.0, 30.0, n)
    s = rng.uniform(0.5, 20.0, n)
    order = rng.permutation(n)  # observation order[k] is the k-th in group order
    xs, ss = x[order], s[order]
    group = np.repeat(np.arange(sizes.size), sizes)
    w = 1.0 / (ss * ss)
    total_w = np.bincount(group, w)[group]
    total_wx = np.bincount(group, w * xs)[group]
    others_w = total_w - w
    keep = others_w > 1e-9 * total_w
    mean = (total_wx[keep] - w[keep] * xs[keep]) / others_w[keep]
    delta_numpy = (xs[keep] - mean) / np.sqrt(ss[keep] ** 2 + 1.0 / others_w[keep])
    delta, others_mean, group_kept = leave_one_out_deviations(x, s, group_start, order=order)
    assert np.array_equal(delta, delta_numpy)
    assert np.array_equal(others_mean, mean)
    assert np.array_equal(group_kept, group[keep])


@pytest.mark.parametrize("sigma_factor", [1.0, 0.5])
def test_calibration_on_exact_sigmas(sigma_factor):
    sim = simulate(seed=4, d_min=2.2)
    grouped = Groupings(sim.miller_index, sim.space_group, sim.unit_cell).get(True)
    cal = sigma_calibration(sim.intensity, sim.sigma * sigma_factor, grouped)
    truth = 1.0 / sigma_factor
    assert cal["sd"] == pytest.approx(truth, rel=0.02)
    assert cal["robust_sd"] == pytest.approx(truth, rel=0.03)
    for key in ("by_intensity", "by_resolution"):
        assert len(cal[key]) == 10
        for b in cal[key]:
            assert b["sd"] == pytest.approx(truth, rel=0.08), (key, b)
    points = np.array(cal["normal_probability_plot"])
    # the central part of the plot has slope SD
    centre = np.abs(points[:, 0]) < 1.5
    slope = np.polyfit(points[centre, 0], points[centre, 1], 1)[0]
    assert slope == pytest.approx(truth, rel=0.05)
    text = format_calibration(cal)
    assert f"SD {cal['sd']:.3f}" in text and "d (A)" in text


def test_stable_order_of_group_values_equals_a_stable_sort_of_the_expanded_values():
    """The resolution bins' order from a sort of the groups alone: the same permutation as a
    stable argsort of every observation's value (many tied values, empty groups)."""
    from dials_vmerge.merging.calibration import stable_order_of_group_values

    rng = np.random.default_rng(5)
    for trial in range(40):
        n_groups = int(rng.integers(1, 400))
        values = (rng.integers(0, 6, n_groups).astype(float) if trial % 2
                  else rng.random(n_groups))
        group = np.sort(rng.integers(0, n_groups, int(rng.integers(1, 3000))))
        np.testing.assert_array_equal(stable_order_of_group_values(values, group),
                                      np.argsort(values[group], kind="stable"))
