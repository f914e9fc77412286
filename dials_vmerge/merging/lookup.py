"""Find Miller indices in another list of Miller indices (vectorised, no Python loop)."""

import numpy as np


def _pack(hkl: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    h = hkl.astype(np.int64) - lo
    return (h[:, 0] * size[1] + h[:, 1]) * size[2] + h[:, 2]


def find_indices(needles: np.ndarray, haystack: np.ndarray) -> np.ndarray:
    """Position of each needle row in haystack (rows unique), or -1 where absent."""
    needles = np.asarray(needles, dtype=np.int64).reshape(-1, 3)
    haystack = np.asarray(haystack, dtype=np.int64).reshape(-1, 3)
    if len(needles) == 0 or len(haystack) == 0:
        return np.full(len(needles), -1, dtype=np.int64)
    both = np.concatenate([needles, haystack])
    lo = both.min(axis=0)
    size = both.max(axis=0) - lo + 1
    keys = _pack(haystack, lo, size)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    wanted = _pack(needles, lo, size)
    pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == wanted, order[pos], -1).astype(np.int64)
