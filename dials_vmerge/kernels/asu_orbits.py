"""Symmetry orbits of Miller indices: one canonical member per orbit, and the distinct orbits
of many rows, so that the reciprocal-ASU mapping (cctbx) runs once per distinct reflection
instead of once per observation (issue 10: four mappings of a 1e6-row sweep cost ~0.35 s).

The ASU index of h is a function of its orbit alone ({h R} over the point group's rotations
R, and their negatives when Friedel mates are merged): every member of an orbit maps to the
same ASU index, which is what the ASU is. So mapping each orbit's canonical member (the
lexicographically largest) gives every row's ASU index exactly as mapping the row itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def canonical_members(hkl, rotations, out):
    """out[i] = the lexicographically largest of hkl[i] R over `rotations` (m, 3, 3), Miller
    indices as row vectors (h'_j = sum_k h_k R_kj). Returns the (low, high) corners of the
    box holding them. (A candidate whose first component is smaller is dropped before its
    other two are formed: half the time of forming and comparing all three.)"""
    n = hkl.shape[0]
    m = rotations.shape[0]
    r = np.empty((m, 9), np.int64)
    for k in range(m):
        for a in range(3):
            for b in range(3):
                r[k, 3 * b + a] = rotations[k, a, b]  # column b of R as r[k, 3b:3b+3]
    low = np.full(3, np.iinfo(np.int64).max, np.int64)
    high = np.full(3, np.iinfo(np.int64).min, np.int64)
    for i in range(n):
        h0 = np.int64(hkl[i, 0])
        h1 = np.int64(hkl[i, 1])
        h2 = np.int64(hkl[i, 2])
        b0 = np.iinfo(np.int64).min
        b1 = b0
        b2 = b0
        for k in range(m):
            c0 = h0 * r[k, 0] + h1 * r[k, 1] + h2 * r[k, 2]
            if c0 < b0:
                continue
            c1 = h0 * r[k, 3] + h1 * r[k, 4] + h2 * r[k, 5]
            c2 = h0 * r[k, 6] + h1 * r[k, 7] + h2 * r[k, 8]
            if c0 > b0 or c1 > b1 or (c1 == b1 and c2 > b2):
                b0 = c0
                b1 = c1
                b2 = c2
        out[i, 0] = b0
        out[i, 1] = b1
        out[i, 2] = b2
        low[0] = min(low[0], b0)
        high[0] = max(high[0], b0)
        low[1] = min(low[1], b1)
        high[1] = max(high[1], b1)
        low[2] = min(low[2], b2)
        high[2] = max(high[2], b2)
    return low, high


@njit(cache=True)
def distinct_rows(members, low, span, slot):
    """Number the distinct rows of `members` (n, 3) in order of first appearance: returns
    (orbit number of each row, int32; the first row of each orbit, int64). slot: -1s, one
    per cell of the box low .. low + span - 1."""
    n = members.shape[0]
    orbit = np.empty(n, np.int32)
    first = np.empty(n, np.int64)
    n_orbits = 0
    for i in range(n):
        key = ((np.int64(members[i, 0]) - low[0]) * span[1]
               + (np.int64(members[i, 1]) - low[1])) * span[2] + (np.int64(members[i, 2]) - low[2])
        o = slot[key]
        if o < 0:
            o = n_orbits
            slot[key] = o
            first[o] = i
            n_orbits += 1
        orbit[i] = o
    return orbit, first[:n_orbits].copy()

