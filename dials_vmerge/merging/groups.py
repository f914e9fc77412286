"""Observations grouped by unique reflection: the flat layout every merging kernel works on.

Observations are mapped to the reciprocal asymmetric unit (cctbx), stably sorted by the
mapped index in lexicographic (h, k, l) order -- the same order as cctbx's packed indices,
so random half-splits consume random numbers in the same order as cctbx -- and described by
a permutation plus group offsets: the observations of group g are
`permutation[group_start[g]:group_start[g+1]]` in the caller's original row order.

Memory: the cctbx mapping runs on slices of ASU_CHUNK rows, so its flex arrays stay small
whatever the number of observations, and the sort works on one int64 key per observation
(the packed ASU index) rather than on the (n, 3) indices. `Groupings` computes the
non-anomalous and anomalous groupings of one set of observations once and derives the
groupings of a subset of its rows (a resolution cut, a half-dataset) without mapping or
sorting again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from cctbx import miller
from cctbx.array_family import flex

# Rows mapped by cctbx per call: the temporaries (three flex.int, a flex.miller_index, the
# vec3_double and numpy copies, under 100 B/row) stay at a few MB.
ASU_CHUNK = 1 << 16
# Packed keys need (2 c + 1)^3 < 2^63 for ASU components |h| <= c.
_MAX_PACKED_COMPONENT = 1_000_000


@dataclass
class GroupedObservations:
    permutation: np.ndarray  # int64 (n_obs,): sorted position -> original row
    group_start: np.ndarray  # int64 (n_groups + 1,)
    asu_index: np.ndarray  # int32 (n_groups, 3): ASU index of each group
    centric: np.ndarray  # bool (n_groups,)
    epsilon: np.ndarray  # float64 (n_groups,): statistical weight (centring included)
    dstar_sq: np.ndarray  # float64 (n_groups,): 1/d^2 from the unit cell (NaN if no cell)
    anomalous: bool
    # Values derived from asu_index alone (Bijvoet partners, + hemisphere), computed once:
    # statistics (twice, with and without I+/I- apart) and the report's anomalous summary
    # all ask for them. with_cell's copies share the dict (same asu_index); subset makes
    # a fresh grouping with a new one.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_groups(self) -> int:
        return len(self.group_start) - 1

    @property
    def n_obs(self) -> int:
        return len(self.permutation)

    @property
    def multiplicity(self) -> np.ndarray:
        return np.diff(self.group_start)

    @property
    def d(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.dstar_sq)

    def group_of_sorted(self) -> np.ndarray:
        """Group number of each observation in sorted order."""
        return np.repeat(np.arange(self.n_groups, dtype=np.int64), self.multiplicity)

    def group_of_original(self) -> np.ndarray:
        """Group number of each observation in the caller's row order."""
        out = np.empty(self.n_obs, dtype=np.int64)
        out[self.permutation] = self.group_of_sorted()
        return out

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Per-observation values (original order) rearranged into sorted group order."""
        return np.ascontiguousarray(np.asarray(values)[self.permutation])

    def with_cell(self, unit_cell) -> "GroupedObservations":
        """The same grouping with 1/d^2 from another cell (the arrays are shared)."""
        if unit_cell is None or self.n_groups == 0:
            dstar_sq = np.full(self.n_groups, np.nan)
        else:
            dstar_sq = unit_cell.d_star_sq(flex_indices(self.asu_index)).as_numpy_array()
        return replace(self, dstar_sq=dstar_sq)

    def subset(self, keep: np.ndarray) -> "GroupedObservations":
        """The grouping of the rows where `keep` (bool, n_obs) is True, rows renumbered
        0..keep.sum()-1 as in `values[keep]`. Equal to grouping those rows afresh: the sort
        is stable, so within a group the kept rows stay in increasing row order."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.n_obs,):
            raise ValueError("subset: mask length differs from the number of observations")
        kept_sorted = keep[self.permutation]
        counted = np.zeros(self.n_obs + 1, dtype=np.int64)
        np.cumsum(kept_sorted, out=counted[1:])
        counts = counted[self.group_start[1:]] - counted[self.group_start[:-1]]
        del counted
        new_row = np.cumsum(keep, dtype=np.int64)
        new_row -= 1
        permutation = new_row[self.permutation[kept_sorted]]
        del new_row, kept_sorted
        present = counts > 0
        group_start = np.zeros(int(present.sum()) + 1, dtype=np.int64)
        np.cumsum(counts[present], out=group_start[1:])
        return GroupedObservations(
            permutation=permutation,
            group_start=group_start,
            asu_index=np.ascontiguousarray(self.asu_index[present]),
            centric=self.centric[present],
            epsilon=self.epsilon[present],
            dstar_sq=self.dstar_sq[present],
            anomalous=self.anomalous,
        )


def asu_chunks(hkl: np.ndarray, space_group, anomalous: bool, with_isym: bool = False):
    """(start, stop, ASU indices int32 (m, 3), signed cctbx operator numbers or None) for
    consecutive slices of at most ASU_CHUNK rows."""
    space_group_type = space_group.type()
    for start in range(0, len(hkl), ASU_CHUNK):
        stop = min(start + ASU_CHUNK, len(hkl))
        indices = flex_indices(hkl[start:stop])
        isym = None
        if with_isym:
            isym_signed = flex.int(indices.size())
            miller.map_to_asu_isym(space_group_type, bool(anomalous), indices, isym_signed)
            isym = isym_signed.as_numpy_array()
        else:
            miller.map_to_asu(space_group_type, bool(anomalous), indices)
        yield start, stop, _numpy_indices(indices), isym


def map_indices_to_asu(miller_index, space_group, anomalous: bool):
    """ASU index of each observation, and the signed cctbx operator number that maps it."""
    hkl = np.asarray(miller_index).reshape(-1, 3)
    asu = np.empty((len(hkl), 3), dtype=np.int32)
    isym = np.empty(len(hkl), dtype=np.int32)
    for start, stop, chunk, isym_chunk in asu_chunks(hkl, space_group, anomalous, True):
        asu[start:stop] = chunk
        isym[start:stop] = isym_chunk
    return asu, isym


def mtz_isym(miller_index, space_group) -> np.ndarray:
    """MTZ M/ISYM: 2*op+1 if asu = h.R_op, 2*op+2 if asu = -h.R_op (op 0-based, + hemisphere)."""
    hkl = np.asarray(miller_index).reshape(-1, 3)
    # The sign of cctbx's isym cannot mark a Friedel mate for operator 0, so recompute h.R.
    rotations = np.array(
        [np.array(o.r().num(), dtype=np.int64).reshape(3, 3) for o in space_group.all_ops()]
    )
    out = np.empty(len(hkl), dtype=np.int32)
    for start, stop, asu, isym_signed in asu_chunks(hkl, space_group, False, True):
        op = np.abs(isym_signed).astype(np.int64)
        rotated = np.einsum("ni,nij->nj", hkl[start:stop].astype(np.int64), rotations[op])
        friedel = ~np.all(rotated == asu, axis=1)
        out[start:stop] = 2 * op + 1 + friedel
    return out


def flex_indices(hkl: np.ndarray):
    """A cctbx flex.miller_index of an (n, 3) integer array."""
    hkl = np.asarray(hkl).reshape(-1, 3)
    columns = [flex.int(np.ascontiguousarray(hkl[:, i], dtype=np.int32)) for i in range(3)]
    return flex.miller_index(*columns)


def _numpy_indices(indices) -> np.ndarray:
    # flex.miller_index offers no integer buffer; the doubles hold the integers exactly, so
    # the cast back needs no rounding. Callers pass chunks, which bounds the 24 B/row copy.
    return indices.as_vec3_double().as_double().as_numpy_array().reshape(-1, 3).astype(np.int32)


def per_index_chunks(miller_index, function, dtype=np.float64) -> np.ndarray:
    """function(flex.miller_index of a slice) -> flex array, for all rows in ASU_CHUNK slices
    (a cctbx unit-cell call on every observation without a full-size flex copy)."""
    hkl = np.asarray(miller_index).reshape(-1, 3)
    out = np.empty(len(hkl), dtype=dtype)
    for start in range(0, len(hkl), ASU_CHUNK):
        stop = min(start + ASU_CHUNK, len(hkl))
        out[start:stop] = function(flex_indices(hkl[start:stop])).as_numpy_array()
    return out


def _component_bound(hkl: np.ndarray, space_group) -> int:
    """c with |component| <= c for every ASU index of `hkl`: the ASU index is +-h.R for an
    operator R of the group, so |h'_j| <= max|h| * max_j sum_i |R_ij|."""
    if len(hkl) == 0:
        return 0
    largest = max(abs(int(hkl.min())), abs(int(hkl.max())))
    spread = 0
    for op in space_group.all_ops():
        r = np.abs(np.array(op.r().as_double()).reshape(3, 3))
        spread = max(spread, int(np.ceil(r.sum(axis=0).max())), int(np.ceil(r.sum(axis=1).max())))
    return largest * max(spread, 1)


def sort_into_groups(asu: np.ndarray):
    """Stable lexicographic sort of ASU indices: (permutation, group_start)."""
    n = len(asu)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    permutation = np.lexsort((asu[:, 2], asu[:, 1], asu[:, 0])).astype(np.int64)
    ordered = asu[permutation]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    group_start = np.append(np.flatnonzero(new_group), n).astype(np.int64)
    return permutation, group_start


def _stable_key_order(keys, span: int):
    """np.argsort(keys, kind="stable") of packed keys in 0..span-1: by the counting sort of
    kernels/group_sort.py (the same permutation, O(rows + span): ~5 against ~30-40 ms for a
    1e6 sweep's keys; issue 10) where its int32 counts take no more memory than the merge
    sort's buffer (span <= rows); numpy's sort otherwise."""
    n = keys.size
    if 0 < span <= n:
        from ..kernels.group_sort import grouped_counting_sort

        return grouped_counting_sort(keys, span)[0]
    return np.argsort(keys, kind="stable")


def _groups_of_sorted_keys(ordered, lo, span):
    """(group_start, unique (n_groups, 3) int32) of observations sorted by their packed ASU
    index ((h - lo_h) s_k + k - lo_k) s_l + l - lo_l (s = span): one group per distinct
    key, its index unpacked. (The caller drops the unsorted keys first: peak memory.)"""
    n = ordered.size
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    del new_group
    group_keys = ordered[starts]
    group_start = np.append(starts, n).astype(np.int64)
    unique = np.empty((len(group_keys), 3), dtype=np.int32)
    unique[:, 2] = group_keys % span[2] + lo[2]
    group_keys //= span[2]
    unique[:, 1] = group_keys % span[1] + lo[1]
    unique[:, 0] = group_keys // span[1] + lo[0]
    return group_start, unique


def _asu_slices(hkl, space_group, anomalous):
    """asu_chunks's slices, from one cctbx mapping per reflection when the rows allow
    (asu_mapping.py, issue 10), else from cctbx's mapping of every row."""
    from ..asu_mapping import asu_indices_by_orbit

    asu = asu_indices_by_orbit(hkl, space_group, anomalous)
    if asu is None:
        yield from asu_chunks(hkl, space_group, anomalous)
        return
    for start in range(0, len(hkl), ASU_CHUNK):
        stop = min(start + ASU_CHUNK, len(hkl))
        yield start, stop, asu[start:stop], None


def group_observations(miller_index, space_group, anomalous: bool, unit_cell=None):
    """Group observations by unique reflection (Friedel mates apart if `anomalous`)."""
    hkl = np.asarray(miller_index).reshape(-1, 3)
    n = len(hkl)
    bound = _component_bound(hkl, space_group)
    if n == 0:
        permutation, group_start = np.zeros(0, np.int64), np.zeros(1, np.int64)
        unique = np.zeros((0, 3), np.int32)
    elif bound <= _MAX_PACKED_COMPONENT:
        # Keys ((h + c) s + k + c) s + l + c, s = 2c + 1, sort like (h, k, l) lexicographically.
        size = 2 * bound + 1
        keys = np.empty(n, dtype=np.int64)
        for start, stop, asu, _ in _asu_slices(hkl, space_group, anomalous):
            if asu.size and (int(asu.min()) < -bound or int(asu.max()) > bound):
                raise AssertionError("ASU index outside the bound of its operators")
            shifted = asu.astype(np.int64) + bound
            keys[start:stop] = (shifted[:, 0] * size + shifted[:, 1]) * size + shifted[:, 2]
        permutation = _stable_key_order(keys, size ** 3)
        ordered = keys[permutation]
        del keys
        group_start, unique = _groups_of_sorted_keys(
            ordered, np.full(3, -bound, dtype=np.int64), np.full(3, size, dtype=np.int64))
        del ordered
    else:  # absurdly large indices: sort the (n, 3) indices themselves
        asu, _ = map_indices_to_asu(hkl, space_group, anomalous)
        permutation, group_start = sort_into_groups(asu)
        unique = np.ascontiguousarray(asu[permutation[group_start[:-1]]])
    centric, epsilon, dstar_sq = unique_properties(unique, space_group, unit_cell)
    return GroupedObservations(
        permutation=permutation,
        group_start=group_start,
        asu_index=unique,
        centric=centric,
        epsilon=epsilon,
        dstar_sq=dstar_sq,
        anomalous=bool(anomalous),
    )


def non_anomalous_from_anomalous(anomalous: GroupedObservations, space_group,
                                 unit_cell=None) -> GroupedObservations:
    """group_observations(miller_index, space_group, False, unit_cell) of the observations
    whose anomalous grouping is given, without mapping every observation again: an
    observation's ASU index with Friedel mates together is that of its anomalous group's
    index (both are symmetry or Friedel equivalents of it), so only the groups are mapped.
    The observations are then sorted stably by that index, as group_observations does:
    the same permutation, group offsets and unique indices."""
    n = anomalous.n_obs
    if n == 0 or anomalous.n_groups == 0:
        return replace(anomalous, anomalous=False)
    from ..asu_mapping import asu_indices

    group_asu = asu_indices(anomalous.asu_index, space_group, False)  # by orbit (issue 10)
    from .lookup import column_bounds

    lo, high = column_bounds(group_asu)
    span = high - lo + 1
    shifted = group_asu.astype(np.int64) - lo
    # ((h - lo_h) s_k + k - lo_k) s_l + l - lo_l: ordered like (h, k, l), < 2^63 for any
    # indices cctbx maps
    group_key = (shifted[:, 0] * span[1] + shifted[:, 1]) * span[2] + shifted[:, 2]
    del shifted
    keys = group_key[anomalous.group_of_original()]
    permutation = _stable_key_order(keys, int(span[0]) * int(span[1]) * int(span[2]))
    ordered = keys[permutation]
    del keys
    group_start, unique = _groups_of_sorted_keys(ordered, lo, span)
    del ordered
    centric, epsilon, dstar_sq = unique_properties(unique, space_group, unit_cell)
    return GroupedObservations(permutation=permutation, group_start=group_start,
                               asu_index=unique, centric=centric, epsilon=epsilon,
                               dstar_sq=dstar_sq, anomalous=False)


def unique_properties(unique: np.ndarray, space_group, unit_cell=None):
    """Centric flags, epsilon and 1/d^2 of a list of unique indices."""
    if len(unique) == 0:
        return np.zeros(0, bool), np.zeros(0), np.zeros(0)
    indices = flex_indices(unique)
    # as_numpy_array: np.array of a flex array walks it element by element in Python
    # (0.17 s for 3e5 groups, against 0.01 s)
    centric = space_group.is_centric(indices).as_numpy_array().astype(bool, copy=False)
    epsilon = space_group.epsilon(indices).as_numpy_array().astype(np.float64)
    if unit_cell is not None:
        dstar_sq = unit_cell.d_star_sq(indices).as_numpy_array()
    else:
        dstar_sq = np.full(len(unique), np.nan)
    return centric, epsilon, dstar_sq


class Groupings:
    """The groupings of one set of observations (Friedel mates together and apart), each
    mapped and sorted once, on first use, and shared by merging and every statistic.

    `get(anomalous, unit_cell)` returns the grouping with 1/d^2 of `unit_cell` (default the
    cell given here); `subset(keep)` the Groupings of the rows `keep`, derived from these
    groupings rather than computed afresh."""

    def __init__(self, miller_index, space_group, unit_cell=None, *, _parent=None, _keep=None):
        self.miller_index = miller_index
        self.space_group = space_group
        self.unit_cell = unit_cell
        self._parent = _parent
        self._keep = _keep
        self._base = {}
        self._by_cell = {}

    def get(self, anomalous: bool, unit_cell=None) -> GroupedObservations:
        anomalous = bool(anomalous)
        base = self._base.get(anomalous)
        if base is None:
            if self._parent is not None:
                base = self._parent.get(anomalous).subset(self._keep)
            elif not anomalous and True in self._base:
                # the anomalous grouping is there: map its groups, not every observation
                base = non_anomalous_from_anomalous(self._base[True], self.space_group,
                                                    self.unit_cell)
            else:
                base = group_observations(self.miller_index, self.space_group, anomalous,
                                          self.unit_cell)
            self._base[anomalous] = base
        if unit_cell is None or _same_cell(unit_cell, self.unit_cell):
            return base
        key = (anomalous, tuple(unit_cell.parameters()))
        if key not in self._by_cell:
            self._by_cell[key] = base.with_cell(unit_cell)
        return self._by_cell[key]

    def subset(self, keep) -> "Groupings":
        keep = np.asarray(keep, dtype=bool)
        return Groupings(None, self.space_group, self.unit_cell, _parent=self, _keep=keep)


def _same_cell(a, b) -> bool:
    return a is b or (a is not None and b is not None
                      and tuple(a.parameters()) == tuple(b.parameters()))
