"""The partition pass's compact forms (issue 11, session 10: its transients bounded every MPI
rank's peak): the sliced box count and the packed partial candidates must give the counts of
an independent computation."""

import numpy as np

from dials_vmerge.backends import rank_partition
from dials_vmerge.backends.rank_partition import (_distinct_key_counts, _packed_candidates,
                                                  prepared_key_counts)


def test_sliced_box_count_equals_numpy_unique_for_any_slice():
    rng = np.random.default_rng(11)
    hkl = rng.integers(-40, 40, (5003, 3))
    hkl[:7] = [[-900, 2, 3]] * 7  # the box's extremes in the first slice only
    hkl[-3:] = [[5, 600, -1]] * 3  # and in the last
    keys = rank_partition.packed_keys(hkl)
    expected = np.unique(keys, return_counts=True)
    for chunk_rows in (1, 7, 1000, 1 << 20):
        got = _distinct_key_counts(keys, chunk_rows=chunk_rows)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def _slices(ids, partial_id, keys, chunk_rows):
    """_rows_preparation_drops's shape: per slice (keys of id < 0, candidates)."""
    out = []
    for start in range(0, keys.size, chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, keys.size))
        candidate = ids[rows] >= 0
        at = rows[candidate]
        out.append((keys[rows[ids[rows] < 0]],
                    (ids[at], partial_id[at], at, keys[at])))
    return out


def _independent_counts(ids, partial_id, keys):
    # the rows preparation keeps: id >= 0, and of each (id, partial_id) the first row
    seen, kept = set(), {}
    for i, p, k in zip(ids.tolist(), partial_id.tolist(), keys.tolist()):
        if i < 0 or (i, p) in seen:
            continue
        seen.add((i, p))
        kept[k] = kept.get(k, 0) + 1
    distinct = np.array(sorted(kept), dtype=np.int64)
    return distinct, np.array([kept[k] for k in distinct.tolist()], dtype=np.int64)


def test_packed_candidates_give_the_counts_of_an_independent_computation():
    rng = np.random.default_rng(12)
    n = 6000
    ids = rng.integers(-1, 4, n)
    partial_id = rng.integers(0, 900, n)  # ~1/3 of the rows repeat an (id, partial_id)
    keys = rank_partition.packed_keys(rng.integers(-6, 6, (n, 3)))
    distinct, counts = np.unique(keys, return_counts=True)
    expected = _independent_counts(ids, partial_id, keys)
    assert expected[1].sum() < (ids >= 0).sum() - 1000  # pieces were dropped
    for chunk_rows in (1, 97, n):
        plain = prepared_key_counts(distinct, counts, _slices(ids, partial_id, keys, chunk_rows))
        packed = prepared_key_counts(distinct, counts, [
            (d, _packed_candidates(c)) for d, c in _slices(ids, partial_id, keys, chunk_rows)])
        for got in (plain, packed):
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    # a key whose pieces sit at different keys: the first piece's key keeps the count
    # (the sort must be stable in row order, not by key)
    ids2 = np.zeros(4, np.int64)
    pid2 = np.array([5, 5, 5, 6])
    keys2 = np.array([30, 10, 20, 10], np.int64)
    d2, c2 = np.unique(keys2, return_counts=True)
    for pieces in (_slices(ids2, pid2, keys2, 1),
                   [(d, _packed_candidates(c)) for d, c in _slices(ids2, pid2, keys2, 1)]):
        got = prepared_key_counts(d2, c2, pieces)
        assert got[0].tolist() == [10, 30] and got[1].tolist() == [1, 1]


def test_unpackable_candidates_stay_whole_and_mix_with_packed_ones():
    big = (np.array([1 << 31]), np.array([0]), np.array([0]), np.array([7]))
    assert _packed_candidates(big) is big
    negative = (np.array([0]), np.array([-1]), np.array([0]), np.array([7]))
    assert _packed_candidates(negative) is negative
    # slice 0 packed, slice 1 not (a partial_id >= 2^32): the mixed path still drops the
    # later piece of (0, 3) (rows 0 and 2) and keeps both rows of id 1 << 31
    first = _packed_candidates((np.array([0, 0]), np.array([3, 4]), np.array([0, 1]),
                                np.array([100, 200], np.int64)))
    second = (np.array([0, 1 << 31, 1 << 31]), np.array([3, 1 << 32, 1]),
              np.array([2, 3, 4]), np.array([300, 300, 300], np.int64))
    assert len(first) == 2 and _packed_candidates(second) is second
    distinct, counts = np.array([100, 200, 300]), np.array([1, 1, 3])
    got = prepared_key_counts(distinct, counts, [(np.zeros(0, np.int64), first),
                                                 (np.zeros(0, np.int64), second)])
    assert got[0].tolist() == [100, 200, 300] and got[1].tolist() == [1, 1, 2]
