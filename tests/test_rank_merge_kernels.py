"""The stream offsets and half splits of merging/rank_merge.py against the one-process kernels
of merging/statistics.py (no MPI needed): drawing each group's halves from the offset that
_draw_offsets gives it reproduces cctbx's one-stream split group for group."""

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge.merging import statistics as st
from dials_vmerge.merging.rank_merge import _draw_offsets


def _groups(seed, n_groups=400):
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(0, 9, n_groups)  # 0 and 1 included: no draws
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n_obs = int(group_start[-1])
    permutation = rng.permutation(n_obs).astype(np.int64)
    intensity = rng.normal(100.0, 30.0, n_obs)
    sigma = rng.uniform(1.0, 5.0, n_obs)
    return multiplicity, group_start, permutation, intensity, sigma


def test_offsets_reproduce_the_one_stream_split():
    for seed in range(5):
        multiplicity, group_start, permutation, intensity, sigma = _groups(seed)
        rng = np.random.default_rng(100 + seed)
        order = np.sort(rng.choice(multiplicity.size, 300, replace=False)).astype(np.int64)
        uniforms = st.cctbx_uniform_stream(4 * int(group_start[-1]) + 8)
        starts = _draw_offsets(multiplicity[order], uniforms)
        for weighted in (True, False):
            h1, h2 = st.half_split_kernel(intensity, sigma, permutation, group_start, order,
                                          uniforms, weighted)
            # every "rank" its own slice of the order, drawing from its groups' offsets
            for lo, hi in ((0, 97), (97, 98), (98, 300)):
                r1, r2 = st.half_means_from_draw_starts(intensity, sigma, permutation,
                                                        group_start, order[lo:hi], uniforms,
                                                        weighted, starts[lo:hi])
                assert np.array_equal(np.isnan(r1), np.isnan(h1[lo:hi]))
                ok = ~np.isnan(r1)
                assert np.array_equal(r1[ok], h1[lo:hi][ok])  # the same bits
                assert np.array_equal(r2[ok], h2[lo:hi][ok])
        labels = st.half_split_assignment_kernel(permutation, group_start, order, uniforms,
                                                 intensity.size)
        pieces = np.zeros(intensity.size, np.int8)
        for lo, hi in ((0, 150), (150, 300)):
            pieces += st.half_labels_from_draw_starts(permutation, group_start, order[lo:hi],
                                                      uniforms, intensity.size, starts[lo:hi])
        assert np.array_equal(pieces, labels)


def test_offsets_by_hand():
    """Stream values 0.7, 0.2, ...: n = 3 takes one draw for the odd member (0.7 >= 0.5:
    first half n // 2 = 1) and 1 for that half; n = 1 none; n = 4 two; n = 5 one (0.2 < 0.5:
    first half 3) and 3."""
    uniforms = np.array([0.7, 0.9, 0.3, 0.3, 0.2, 0.1, 0.1, 0.1, 0.9])
    starts = _draw_offsets(np.array([3, 1, 4, 5, 2], dtype=np.int64), uniforms)
    assert starts.tolist() == [0, 2, 2, 4, 8]


def test_batch_sums_continued_run_after_run_are_one_pass():
    """The per-batch sums that each rank continues from the ranks before it
    (add_batch_sums_kernel on consecutive runs of groups, as mpi_world.pass_along_ranks
    chains them) have the bits of one pass over all groups, and one pass equals an
    independent numpy computation of the same sums."""
    from dials_vmerge.merging.batch_statistics import add_batch_sums_kernel, batch_sums_kernel

    multiplicity, group_start, permutation, intensity, sigma = _groups(7)
    rng = np.random.default_rng(8)
    n_obs, n_batches = intensity.size, 13
    batch_index = rng.integers(0, n_batches, n_obs).astype(np.int64)
    scale = rng.uniform(0.5, 2.0, n_obs)
    merged = rng.normal(100.0, 10.0, multiplicity.size)
    complete = rng.random(multiplicity.size) < 0.9
    one_pass = batch_sums_kernel(permutation, group_start, intensity, sigma, scale,
                                 batch_index, merged, complete, n_batches)
    for cuts in ((0, 400), (0, 1, 250, 400), (0, 133, 134, 400)):
        sums = np.zeros((n_batches, one_pass.shape[1]))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            # a rank's own groups: its rows only, renumbered as a rank holds them
            start = group_start[lo:hi + 1] - group_start[lo]
            rows = permutation[group_start[lo]:group_start[hi]]
            add_batch_sums_kernel(sums, np.arange(rows.size, dtype=np.int64), start,
                                  intensity[rows], sigma[rows], scale[rows], batch_index[rows],
                                  merged[lo:hi], complete[lo:hi])
        assert np.array_equal(sums, one_pass)  # the same bits
    group = np.repeat(np.arange(multiplicity.size), multiplicity)
    obs = permutation  # observation k of the sorted order is row permutation[k]
    n_of = multiplicity[group]
    assert np.allclose(one_pass[:, 0], np.bincount(batch_index[obs], minlength=n_batches))
    assert np.allclose(one_pass[:, 1], np.bincount(batch_index[obs], scale[obs], n_batches))
    multi = n_of > 1
    deviation = np.abs(intensity[obs] - merged[group])
    assert np.allclose(one_pass[:, 3], np.bincount(batch_index[obs][multi], deviation[multi],
                                                   n_batches))
    first_batch = np.full(multiplicity.size, n_batches)
    np.minimum.at(first_batch, group, batch_index[obs])
    new = first_batch[(first_batch < n_batches) & complete]
    assert np.array_equal(one_pass[:, 11], np.bincount(new, minlength=n_batches))


def test_order_of_group_runs_against_a_loop():
    """calibration.order_of_group_runs (rank 0 puts the ranks' deviations, gathered group
    after group in rank order, into the one-process group order) against a plain loop."""
    from dials_vmerge.merging.calibration import order_of_group_runs

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5, 200)
    group_order = rng.permutation(200)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    expected = [first[g] + k for g in group_order for k in range(counts[g])]
    assert order_of_group_runs(group_order, counts).tolist() == expected
