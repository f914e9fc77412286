"""CC1/2 and CCanom half-splits of every shell in one kernel call (statistics
half_split_orders_kernel, _Prepared.shell_halves): each order's half means must equal its own
half_split_kernel call (the stream restarts per order) whichever worker takes it, and the
statistics tables must equal those computed shell by shell."""

import numpy as np

from merging_simulation import simulate

from dials_vmerge.merging import statistics
from dials_vmerge.merging.statistics import (half_split_kernel, half_split_orders_kernel,
                                             merging_statistics)


def _groups(rng, n_groups):
    sizes = rng.integers(1, 9, n_groups)
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(group_start[-1])
    permutation = rng.permutation(n).astype(np.int64)
    return group_start, permutation, n


def test_orders_kernel_equals_one_call_per_order_for_any_worker_split():
    rng = np.random.default_rng(3)
    # more than PARALLEL_MIN_ROWS observations: the parallel build runs
    group_start, permutation, n = _groups(rng, 15_000)
    intensity = rng.normal(100.0, 30.0, n)
    sigma = rng.uniform(1.0, 9.0, n)
    uniforms = rng.random(n)
    shell = rng.integers(0, 5, group_start.size - 1)
    orders = [np.arange(group_start.size - 1, dtype=np.int64)] + [
        np.flatnonzero(shell == b).astype(np.int64) for b in range(5)] + [
        np.zeros(0, np.int64)]  # an empty shell
    order_start = np.concatenate([[0], np.cumsum([o.size for o in orders])]).astype(np.int64)
    for weighted in (True, False):
        expected = [half_split_kernel(intensity, sigma, permutation, group_start, o,
                                      uniforms, weighted) for o in orders]
        # the recomputation is not vacuous: halves differ between groups, NaN for n = 1
        assert np.isnan(expected[0][0]).any() and np.nanstd(expected[0][0]) > 0
        for split in ([list(range(len(orders)))],  # one worker, orders in turn
                      [[0], [1, 2, 3, 4, 5, 6]],  # the overall order alone
                      [[6, 3], [1], [5, 0, 2, 4]]):  # three workers, any order
            worker_orders = np.array([j for w in split for j in w], dtype=np.int64)
            worker_start = np.concatenate([[0], np.cumsum([len(w) for w in split])]).astype(
                np.int64)
            half_1, half_2 = half_split_orders_kernel(
                intensity, sigma, permutation, group_start, np.concatenate(orders),
                order_start, worker_orders, worker_start, uniforms, weighted)
            for j, (h1, h2) in enumerate(expected):
                lo, hi = order_start[j], order_start[j + 1]
                np.testing.assert_array_equal(half_1[lo:hi], h1)
                np.testing.assert_array_equal(half_2[lo:hi], h2)


def test_statistics_with_shell_halves_equal_shell_by_shell(monkeypatch):
    sim = simulate(seed=4, d_min=2.0, wilson_b=90.0, scale=200.0, n_batches=30)
    rng = np.random.default_rng(4)
    intensity = sim.intensity + rng.normal(0, 3, len(sim.sigma)) * sim.sigma

    def tables():
        result = merging_statistics(sim.miller_index, intensity, sim.sigma, sim.space_group,
                                    sim.unit_cell, n_bins=10, with_anomalous_table=True)
        return [result.as_dict(), result.anomalous_statistics.as_dict(),
                result.cut_statistics and result.cut_statistics.as_dict()]

    handed_out = []
    shell_halves = statistics._Prepared.shell_halves

    def counting(self, groups, order, weighted):
        halves = shell_halves(self, groups, order, weighted)
        handed_out.append(halves is not None)
        return halves

    monkeypatch.setattr(statistics._Prepared, "shell_halves", counting)
    batched = tables()
    # every half-split request was served from the one call per grouping
    assert handed_out and all(handed_out)
    monkeypatch.setattr(statistics._Prepared, "shell_halves", lambda *args: None)
    assert tables() == batched
    assert batched[0]["overall"]["cc_half"] > 0
