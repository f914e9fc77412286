"""Observations grouped by unique reflection: the flat layout every merging kernel works on.

Observations are mapped to the reciprocal asymmetric unit (cctbx), stably sorted by the
mapped index in lexicographic (h, k, l) order -- the same order as cctbx's packed indices,
so random half-splits consume random numbers in the same order as cctbx -- and described by
a permutation plus group offsets: the observations of group g are
`permutation[group_start[g]:group_start[g+1]]` in the caller's original row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cctbx import crystal, miller
from cctbx.array_family import flex


@dataclass
class GroupedObservations:
    permutation: np.ndarray  # int64 (n_obs,): sorted position -> original row
    group_start: np.ndarray  # int64 (n_groups + 1,)
    asu_index: np.ndarray  # int32 (n_groups, 3): ASU index of each group
    centric: np.ndarray  # bool (n_groups,)
    epsilon: np.ndarray  # float64 (n_groups,): statistical weight (centring included)
    dstar_sq: np.ndarray  # float64 (n_groups,): 1/d^2 from the unit cell (NaN if no cell)
    anomalous: bool

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


def map_indices_to_asu(miller_index, space_group, anomalous: bool):
    """ASU index of each observation, and the signed cctbx operator number that maps it."""
    hkl = np.ascontiguousarray(np.asarray(miller_index, dtype=np.int32).reshape(-1, 3))
    indices = _flex_indices(hkl)
    isym_signed = flex.int(indices.size())
    miller.map_to_asu_isym(space_group.type(), anomalous, indices, isym_signed)
    return _numpy_indices(indices), isym_signed.as_numpy_array()


def mtz_isym(miller_index, space_group) -> np.ndarray:
    """MTZ M/ISYM: 2*op+1 if asu = h.R_op, 2*op+2 if asu = -h.R_op (op 0-based, + hemisphere)."""
    hkl = np.asarray(miller_index, dtype=np.int64).reshape(-1, 3)
    asu, isym_signed = map_indices_to_asu(hkl, space_group, anomalous=False)
    op = np.abs(isym_signed).astype(np.int64)
    # The sign of cctbx's isym cannot mark a Friedel mate for operator 0, so recompute h.R.
    rotations = np.array(
        [np.array(o.r().num(), dtype=np.int64).reshape(3, 3) for o in space_group.all_ops()]
    )
    rotated = np.einsum("ni,nij->nj", hkl, rotations[op])
    friedel = ~np.all(rotated == asu, axis=1)
    return (2 * op + 1 + friedel).astype(np.int32)


def _flex_indices(hkl: np.ndarray):
    hkl = np.asarray(hkl, dtype=np.int32)
    columns = [flex.int(np.ascontiguousarray(hkl[:, i])) for i in range(3)]
    return flex.miller_index(*columns)


def _numpy_indices(indices) -> np.ndarray:
    return np.asarray(indices.as_vec3_double().as_numpy_array()).round().astype(np.int32)


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


def group_observations(miller_index, space_group, anomalous: bool, unit_cell=None):
    """Group observations by unique reflection (Friedel mates apart if `anomalous`)."""
    asu, _ = map_indices_to_asu(miller_index, space_group, anomalous)
    permutation, group_start = sort_into_groups(asu)
    unique = np.ascontiguousarray(asu[permutation[group_start[:-1]]]) if len(asu) else (
        np.zeros((0, 3), np.int32)
    )
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


def unique_properties(unique: np.ndarray, space_group, unit_cell=None):
    """Centric flags, epsilon and 1/d^2 of a list of unique indices."""
    if len(unique) == 0:
        return np.zeros(0, bool), np.zeros(0), np.zeros(0)
    indices = _flex_indices(unique)
    centric = np.array(space_group.is_centric(indices), dtype=bool)
    epsilon = np.array(space_group.epsilon(indices), dtype=np.float64)
    if unit_cell is not None:
        dstar_sq = unit_cell.d_star_sq(indices).as_numpy_array()
    else:
        dstar_sq = np.full(len(unique), np.nan)
    return centric, epsilon, dstar_sq
