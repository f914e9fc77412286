"""Find Miller indices in another list of Miller indices (vectorised, no Python loop)."""

import numpy as np


def _pack(hkl: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    h = hkl.astype(np.int64) - lo
    return (h[:, 0] * size[1] + h[:, 1]) * size[2] + h[:, 2]


def find_indices(needles: np.ndarray, haystack: np.ndarray) -> np.ndarray:
    """Position of each needle row in haystack (rows unique), or -1 where absent."""
    return find_indices_of_sets([needles], haystack)[0]


def find_indices_of_sets(needle_sets, haystack: np.ndarray) -> list:
    """[find_indices(needles, haystack) for needles in needle_sets], the haystack packed and
    sorted once (the Friedel positions look up h and -h in one anomalous merge: issue 10).
    The positions do not depend on the packing's box, only on which rows are equal."""
    needle_sets = [np.asarray(n, dtype=np.int64).reshape(-1, 3) for n in needle_sets]
    haystack = np.asarray(haystack, dtype=np.int64).reshape(-1, 3)
    searched = [n for n in needle_sets if len(n)]
    if not searched or len(haystack) == 0:
        return [np.full(len(n), -1, dtype=np.int64) for n in needle_sets]
    both = np.concatenate(searched + [haystack])
    lo = both.min(axis=0)
    size = both.max(axis=0) - lo + 1
    del both
    keys = _pack(haystack, lo, size)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    found = []
    for needles in needle_sets:
        if len(needles) == 0:
            found.append(np.full(0, -1, dtype=np.int64))
            continue
        wanted = _pack(needles, lo, size)
        pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(sorted_keys) - 1)
        found.append(np.where(sorted_keys[pos] == wanted, order[pos], -1).astype(np.int64))
    return found
