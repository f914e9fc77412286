"""The grouped counting sort (kernels/group_sort.py) against numpy's stable argsort."""

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.kernels.group_sort import _grouped_counting_sort, grouped_counting_sort
from dials_vmerge.scaling import ih_table


def reference(keys):
    """Stable argsort and the offsets of runs of equal keys, computed with numpy alone."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if sorted_keys.size == 0:
        return order, np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return order, np.r_[starts, sorted_keys.size].astype(np.int64)


@pytest.mark.parametrize("n, span", [(1, 1), (7, 1), (50, 3), (1000, 20), (5000, 40000),
                                     (20000, 7)])
def test_matches_stable_argsort(n, span):
    rng = np.random.default_rng(n + span)
    keys = rng.integers(0, span, n)
    order, group_start = grouped_counting_sort(keys, span)
    expected_order, expected_start = reference(keys)
    assert order.dtype == np.int64 and group_start.dtype == np.int64
    assert np.array_equal(order, expected_order)
    assert np.array_equal(group_start, expected_start)
    # the int64 counts (used above 2^31 rows) give the same
    order64, start64 = _grouped_counting_sort(keys.astype(np.int64), np.zeros(span + 1, np.int64))
    assert np.array_equal(order64, expected_order) and np.array_equal(start64, expected_start)


def test_empty_keys_at_both_ends_and_between():
    keys = np.array([5, 9, 5, 3, 9, 9, 5])
    order, group_start = grouped_counting_sort(keys, 12)
    assert order.tolist() == [3, 0, 2, 6, 1, 4, 5]
    assert group_start.tolist() == [0, 1, 4, 7]


def test_out_of_range_key():
    with pytest.raises(ValueError):
        grouped_counting_sort(np.array([0, 4]), 4)


def test_group_sort_same_with_and_without_counting(monkeypatch):
    """group_sort of ASU indices: the counting sort gives the argsort path's result."""
    rng = np.random.default_rng(3)
    asu = rng.integers(-30, 30, (20000, 3)).astype(np.int32)
    asu[::3] = asu[1::3][: asu[::3].shape[0]]  # repeated reflections
    counted = ih_table.group_sort(asu)
    monkeypatch.setattr(ih_table, "COUNTING_SORT_SPAN_PER_ROW", 0)
    monkeypatch.setattr(ih_table, "COUNTING_SORT_MIN_SPAN", 0)
    sorted_ = ih_table.group_sort(asu)
    assert np.array_equal(counted[0], sorted_[0])
    assert np.array_equal(counted[1], sorted_[1])
