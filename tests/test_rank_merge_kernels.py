"""The stream offsets and half splits of merging/rank_merge.py against the one-process kernels
of merging/statistics.py (no MPI needed): drawing each group's halves from the offset that
_draw_offsets gives it reproduces cctbx's one-stream split group for group."""

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge.merging import statistics as st
from dials_vmerge.merging.rank_merge import _draw_offsets, _half_labels_at, _half_means_at


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
                r1, r2 = _half_means_at(intensity, sigma, permutation, group_start,
                                        order[lo:hi], starts[lo:hi], uniforms, weighted)
                assert np.array_equal(np.isnan(r1), np.isnan(h1[lo:hi]))
                ok = ~np.isnan(r1)
                assert np.array_equal(r1[ok], h1[lo:hi][ok])  # the same bits
                assert np.array_equal(r2[ok], h2[lo:hi][ok])
        labels = st.half_split_assignment_kernel(permutation, group_start, order, uniforms,
                                                 intensity.size)
        pieces = np.zeros(intensity.size, np.int8)
        for lo, hi in ((0, 150), (150, 300)):
            pieces += _half_labels_at(permutation, group_start, order[lo:hi], starts[lo:hi],
                                      uniforms, intensity.size)
        assert np.array_equal(pieces, labels)


def test_offsets_by_hand():
    """Stream values 0.7, 0.2, ...: n = 3 takes one draw for the odd member (0.7 >= 0.5:
    first half n // 2 = 1) and 1 for that half; n = 1 none; n = 4 two; n = 5 one (0.2 < 0.5:
    first half 3) and 3."""
    uniforms = np.array([0.7, 0.9, 0.3, 0.3, 0.2, 0.1, 0.1, 0.1, 0.9])
    starts = _draw_offsets(np.array([3, 1, 4, 5, 2], dtype=np.int64), uniforms)
    assert starts.tolist() == [0, 2, 2, 4, 8]
