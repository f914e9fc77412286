"""Reusing one group sort (GroupLayout, presorted rmeas) gives exactly the tables and numbers
of sorting again."""

import numpy as np
import pytest

from dials_vmerge.scaling import combine
from dials_vmerge.scaling.ih_table import GroupLayout, build_ih_table, pack_indices

RNG = np.random.default_rng(11)


def _datasets(sizes=(300, 200, 250)):
    asu = [RNG.integers(-3, 4, (n, 3)).astype(np.int32) for n in sizes]
    values = [[RNG.normal(100, 10, n) for n in sizes] for _ in range(4)]
    return asu, values


def _assert_same(a, b):
    for name in ("intensity", "variance", "weight", "g", "dataset_id", "loc_index",
                 "group_start", "asu_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_layout_table_equals_build_ih_table():
    asu, (i, v, w, g) = _datasets()
    _assert_same(GroupLayout(asu).table(i, v, w, g), build_ih_table(asu, i, v, w, g))


def test_layout_subset_equals_build_ih_table_of_the_masked_rows():
    asu, (i, v, w, g) = _datasets()
    masks = [RNG.random(a.shape[0]) < 0.4 for a in asu]
    expected = build_ih_table([a[m] for a, m in zip(asu, masks)],
                              [x[m] for x, m in zip(i, masks)], [x[m] for x, m in zip(v, masks)],
                              [x[m] for x, m in zip(w, masks)], [x[m] for x, m in zip(g, masks)],
                              loc_indices=[np.flatnonzero(m) for m in masks])
    _assert_same(GroupLayout(asu).subset(masks).table(i, v, w, g), expected)


def test_pack_indices_orders_lexicographically():
    h = np.array([[1, -2, 3], [0, 5, 5], [1, -2, 2], [-1, 9, 0], [1, -3, 9]], np.int32)
    order = np.argsort(pack_indices(h), kind="stable")
    assert order.tolist() == np.lexsort((h[:, 2], h[:, 1], h[:, 0])).tolist()


def _rmeas_by_hand(asu, intensity, sigma):
    keep = (sigma > 0) & (intensity / np.where(sigma > 0, sigma, 1.0) > 1.0)
    num = den = 0.0
    for key in {tuple(h) for h in asu[keep]}:
        mine = keep & np.all(asu == key, axis=1)
        n = int(mine.sum())
        if n < 2:
            continue
        w = 1.0 / sigma[mine] ** 2
        mean = np.sum(w * intensity[mine]) / np.sum(w)
        num += np.sqrt(n / (n - 1.0)) * np.sum(np.abs(intensity[mine] - mean))
        den += np.sum(intensity[mine])
    return num / den


@pytest.mark.parametrize("nproc", [1, 2])
def test_rmeas_of_the_kept_observations_read_in_place(nproc):
    asu = RNG.integers(-4, 5, (2000, 3)).astype(np.int32)
    intensity = RNG.normal(50, 40, 2000)  # about a fifth fail I/sigma > 1
    sigma = RNG.uniform(1, 30, 2000)
    sigma[::97] = 0.0
    assert combine.rmeas(asu, intensity, sigma, nproc) == pytest.approx(
        _rmeas_by_hand(asu, intensity, sigma), rel=1e-12)
    assert combine.rmeas(asu[:1], intensity[:1], sigma[:1]) == -1.0


def test_capped_weights_equal_ten_times_the_numpy_group_median():
    from dials_vmerge.scaling.ih_table import chunk_bounds
    from dials_vmerge.scaling.outliers import capped_weights_kernel

    # small groups (insertion sort) and stills-sized ones of up to 2000 (sorted in place)
    sizes = np.concatenate([RNG.integers(1, 9, 400), RNG.integers(30, 2000, 20)])
    RNG.shuffle(sizes)
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    weight = RNG.lognormal(0.0, 2.0, group_start[-1])
    expected = np.concatenate([np.minimum(weight[a:b], 10 * np.median(weight[a:b]))
                               for a, b in zip(group_start[:-1], group_start[1:])])
    for nproc in (1, 3):
        out = np.empty_like(weight)
        capped_weights_kernel(weight, group_start, chunk_bounds(group_start, nproc), out)
        assert np.array_equal(out, expected)
    assert (expected < weight).any()  # some weights were capped


def test_layout_of_masked_rows_equals_subset_of_full_layout():
    asu, (i, v, w, g) = _datasets()
    masks = [RNG.random(a.shape[0]) < 0.6 for a in asu]
    direct = GroupLayout([a[m] for a, m in zip(asu, masks)],
                         loc_indices=[np.flatnonzero(m) for m in masks],
                         full_sizes=[a.shape[0] for a in asu])
    _assert_same(direct.table(i, v, w, g), GroupLayout(asu).subset(masks).table(i, v, w, g))


@pytest.mark.parametrize("spread", [6, 4000])
def test_group_sort_is_the_stable_argsort_of_the_packed_indices(spread):
    """The counting sort (few distinct indices, spread 6) and the argsort fallback (packed
    keys spanning far more values than rows, spread 4000) both give numpy's stable order
    and the group boundaries of the sorted (h, k, l)."""
    from dials_vmerge.scaling.ih_table import group_sort

    asu = RNG.integers(-spread, spread + 1, (5000, 3)).astype(np.int32)
    order, group_start = group_sort(asu)
    lexicographic = np.lexsort((asu[:, 2], asu[:, 1], asu[:, 0]))  # stable, h slowest
    assert np.array_equal(order, lexicographic)
    ordered = asu[order]
    changes = np.flatnonzero((ordered[1:] != ordered[:-1]).any(axis=1)) + 1
    assert np.array_equal(group_start, np.concatenate([[0], changes, [asu.shape[0]]]))
    empty_order, empty_start = group_sort(np.zeros((0, 3), np.int32))
    assert empty_order.size == 0 and empty_start.tolist() == [0]


def test_joined_takes_consecutive_slices_of_one_array_without_a_copy():
    """gather's join: per-dataset slices of one flat array (as expand leaves g) are that
    array's span, no copy; anything else (gaps, other arrays, other dtypes) is concatenated
    to the same values."""
    from dials_vmerge.scaling.ih_table import joined

    flat = np.arange(20.0)
    slices = np.split(flat[2:17], [4, 4, 9])  # includes an empty slice
    span = joined(slices)
    assert np.shares_memory(span, flat)
    np.testing.assert_array_equal(span, flat[2:17])
    for parts in ([flat[0:3], flat[4:7]],  # a gap
                  [flat[0:3], np.arange(3.0)],  # two arrays
                  [flat[3:6], flat[0:3]],  # out of order
                  [flat.astype(np.float32)[:5], flat.astype(np.float32)[5:]]):
        out = joined(parts)
        assert not np.shares_memory(out, flat)
        np.testing.assert_array_equal(out, np.concatenate(parts).astype(np.float64))
    column = np.arange(12.0).reshape(3, 4)[:, 0]  # strided: copied
    np.testing.assert_array_equal(joined([column]), [0.0, 4.0, 8.0])
