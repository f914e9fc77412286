"""ΔCC½ under MPI (issue 11): the unique reflections split into contiguous runs (as MPI
ranks hold them), each run's bin sums and leave-one-out corrections continued from the run
before (what rank_local.sequential_over_ranks does between ranks), give the bits of one
pass over all of them, for any split."""

import numpy as np
import pytest

from dials_vmerge.scaling.delta_cc_half import (bin_sums_kernel, cc_half_without_each_group,
                                                cc_of_states, leave_one_out_kernel)

N_BINS = 10


def observations(seed, n_unique=400, n_groups=7):
    rng = np.random.default_rng(seed)
    n_obs = rng.integers(1, 9, n_unique)  # some reflections seen once
    unique = np.repeat(np.arange(n_unique), n_obs)
    truth = rng.gamma(1.5, 100.0, n_unique)
    x = truth[unique] + rng.normal(0, 1, unique.size) * np.sqrt(truth[unique] + 10)
    group = rng.integers(0, n_groups, unique.size)
    # the rows of one reflection in any order, as a table holds them
    order = rng.permutation(unique.size)
    # every key range spans every resolution (as a rank's reflections do)
    bin_of_unique = rng.integers(0, N_BINS, n_unique)
    return x[order], unique[order], group[order], bin_of_unique, n_groups


def run_by_runs(x, unique, group, bin_of_unique, n_groups, bounds):
    """cc_half_without_each_group's two passes, the unique reflections cut at `bounds`
    (each run with its own local numbering, as a rank), each run continuing the sums."""
    runs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = np.flatnonzero((unique >= lo) & (unique < hi))
        local = unique[rows] - lo
        n_local = hi - lo
        runs.append(dict(
            x=x[rows], unique=local, group=group[rows], bins=bin_of_unique[lo:hi],
            sum_x=np.bincount(local, weights=x[rows], minlength=n_local),
            sum_x2=np.bincount(local, weights=x[rows] * x[rows], minlength=n_local),
            n_obs=np.bincount(local, minlength=n_local).astype(np.int64)))
    sums = np.zeros((4, N_BINS))
    for r in runs:
        bin_sums_kernel(r["sum_x"], r["sum_x2"], r["n_obs"], r["bins"], sums)
    state = np.empty((n_groups, 4, N_BINS))
    state[:] = sums
    for r in runs:
        n_local = r["bins"].size
        order = np.argsort(r["group"] * max(n_local, 1) + r["unique"], kind="stable")
        start = np.searchsorted(r["group"][order], np.arange(n_groups + 1)).astype(np.int64)
        leave_one_out_kernel(r["x"][order], r["unique"][order], start, r["sum_x"],
                             r["sum_x2"], r["n_obs"], r["bins"], state)
    return cc_of_states(state)


@pytest.mark.parametrize("seed", [1, 2])
def test_runs_of_unique_reflections_continued_give_one_pass_bits(seed):
    x, unique, group, bins, n_groups = observations(seed)
    _, whole = cc_half_without_each_group(x, unique, group, bins, n_groups, N_BINS)
    n_unique = bins.size
    rng = np.random.default_rng(seed + 10)
    splits = [[0, n_unique], [0, 150, n_unique], [0, 1, 2, 200, 399, n_unique],
              [0, 0, 100, 100, n_unique]]  # empty runs: a rank without rows
    splits.append([0] + sorted(rng.choice(np.arange(1, n_unique), 5, replace=False).tolist())
                  + [n_unique])
    for bounds in splits:
        np.testing.assert_array_equal(run_by_runs(x, unique, group, bins, n_groups, bounds),
                                      whole, err_msg=str(bounds))
    # not a constant: leaving a group out changes CC½, differently for each group
    assert np.unique(whole).size == n_groups


def test_runs_in_another_order_differ():
    """The continued passes are order-dependent floating-point sums: the same runs taken
    last-first do not give the bits of one pass (so the test above can fail)."""
    x, unique, group, bins, n_groups = observations(3)
    _, whole = cc_half_without_each_group(x, unique, group, bins, n_groups, N_BINS)
    n_unique = bins.size
    bounds = [0, 130, 260, n_unique]
    # the same runs in reverse: relabel the reflections so that the last run comes first
    lengths = np.diff(bounds)
    new_start = {2: 0, 1: lengths[2], 0: lengths[2] + lengths[1]}
    relabel = np.empty(n_unique, np.int64)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        relabel[lo:hi] = new_start[i] + np.arange(hi - lo)
    new_bins = np.empty_like(bins)
    new_bins[relabel] = bins
    reversed_bounds = [0, lengths[2], lengths[2] + lengths[1], n_unique]
    other = run_by_runs(x, relabel[unique], group, new_bins, n_groups, reversed_bounds)
    np.testing.assert_allclose(other, whole, rtol=1e-10)
    assert not np.array_equal(other, whole)
