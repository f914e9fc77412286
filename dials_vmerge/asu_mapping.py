"""Reciprocal-ASU indices of many observations, with one cctbx mapping per distinct
reflection (symmetry orbit) instead of one per observation (issue 10).

A 1e6-observation sweep has ~1.6e5 distinct reflections: kernels/asu_orbits.py finds each
row's orbit (its canonical member) and numbers the distinct orbits; cctbx maps one member of
each; every row takes its orbit's ASU index. Exact by construction (the ASU index is a
function of the orbit), and tested against cctbx's mapping of every row in all 230 space
groups. Where the canonical members span a box too large for the numbering table (more
cells than MAX_CELLS_PER_ROW per row, or few rows), callers map row by row as before.
"""

from __future__ import annotations

import numpy as np

# The orbit numbering table is int32 per cell of the canonical members' box: at most this
# many cells per row (8 B/row), or MIN_CELLS whatever the rows (4 MB).
MAX_CELLS_PER_ROW = 2
MIN_CELLS = 1 << 20
# Canonical members are kept as int32.
MAX_BOUND = 2 ** 30
# Below this many rows the per-row mapping is as quick (and compiles nothing).
MIN_ROWS = 1 << 14


def point_group_rotations(space_group, friedel_merged: bool):
    """The distinct rotation parts of the group's operators (m, 3, 3) int64, with their
    negatives when Friedel mates are merged (non-anomalous); None if one is not an integer
    matrix."""
    rotations = set()
    for op in space_group.all_ops():
        r = op.r()
        if r.den() != 1:
            return None
        rotations.add(tuple(int(v) for v in r.num()))
        if friedel_merged:
            rotations.add(tuple(-int(v) for v in r.num()))
    return np.array(sorted(rotations), dtype=np.int64).reshape(-1, 3, 3)


def asu_indices_by_orbit(miller_index, space_group, anomalous: bool, min_rows: int = MIN_ROWS):
    """ASU indices (n, 3) int32 of the observations' Miller indices, equal to cctbx's
    map_to_asu of each row; None where the orbit table would be too large (or the rows too
    few): then map the rows themselves."""
    from .kernels.asu_orbits import canonical_members, distinct_rows
    from .merging.groups import asu_chunks

    hkl = np.ascontiguousarray(np.asarray(miller_index).reshape(-1, 3))
    n = len(hkl)
    if n < max(min_rows, 1):
        return None
    if hkl.dtype not in (np.int32, np.int64):
        hkl = hkl.astype(np.int64)
    rotations = point_group_rotations(space_group, not anomalous)
    if rotations is None:
        return None
    # every component of h R within max|h| * (largest column sum of |R|): int32 holds it
    bound = max(abs(int(hkl.min())), abs(int(hkl.max()))) * max(
        1, int(np.abs(rotations).sum(axis=1).max()))
    if bound > MAX_BOUND:
        return None
    out = np.empty((n, 3), dtype=np.int32)
    low, high = canonical_members(hkl, rotations, out)
    span = high - low + 1
    cells = int(span[0]) * int(span[1]) * int(span[2])
    if cells > max(MAX_CELLS_PER_ROW * n, MIN_CELLS):
        return None
    slot = np.full(cells, -1, dtype=np.int32)
    orbit, first = distinct_rows(out, low, span, slot)
    del slot
    members = out[first]
    orbit_asu = np.empty_like(members)
    for start, stop, chunk, _ in asu_chunks(members, space_group, anomalous):
        orbit_asu[start:stop] = chunk
    del members
    # orbit numbers are < len(orbit_asu) by construction: 'clip' never clips ('raise'
    # would buffer)
    np.take(orbit_asu, orbit, axis=0, out=out, mode="clip")
    return out


def asu_indices(miller_index, space_group, anomalous: bool) -> np.ndarray:
    """ASU indices (n, 3) int32 of the rows' Miller indices as cctbx maps them: by orbit
    where the rows allow, else row by row in slices (merging.groups.asu_chunks)."""
    from .merging.groups import asu_chunks

    hkl = np.asarray(miller_index).reshape(-1, 3)
    asu = asu_indices_by_orbit(hkl, space_group, anomalous)
    if asu is not None:
        return asu
    asu = np.empty((len(hkl), 3), dtype=np.int32)
    for start, stop, chunk, _ in asu_chunks(hkl, space_group, anomalous):
        asu[start:stop] = chunk
    return asu
