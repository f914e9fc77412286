"""Observations grouped by unique reflection (ASU index): flat sorted arrays with offsets.

Every kernel of the scaling core reads an IhTable: the observations of all datasets sorted
by ASU Miller index (lexicographic h, k, l), ties kept in dataset-then-row order, so group g
owns rows group_start[g]:group_start[g+1]. The merged intensity of a group is
Ih = sum(w g I) / sum(w g^2), the least-squares optimum for fixed g (dials-scaling.md 5.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange


def map_indices_to_asu(miller_index, space_group, anomalous):
    """ASU indices (N,3 int32) in a cctbx space group; Friedel mates merge unless anomalous."""
    from cctbx import miller
    from cctbx.array_family import flex

    h = np.ascontiguousarray(miller_index, dtype=np.int32)
    if h.shape[0] == 0:
        return h.reshape(0, 3)
    indices = flex.miller_index(flex.int(np.ascontiguousarray(h[:, 0])),
                                flex.int(np.ascontiguousarray(h[:, 1])),
                                flex.int(np.ascontiguousarray(h[:, 2])))
    miller.map_to_asu(space_group.type(), bool(anomalous), indices)
    return indices.as_vec3_double().as_double().as_numpy_array().reshape(-1, 3).astype(np.int32)


def pack_indices(asu_index):
    """One int64 key per index, ordered like (h, k, l) lexicographically."""
    h = asu_index.astype(np.int64)
    lo = h.min(axis=0) if h.shape[0] else np.zeros(3, np.int64)
    span = (h.max(axis=0) - lo + 1) if h.shape[0] else np.ones(3, np.int64)
    return ((h[:, 0] - lo[0]) * span[1] + (h[:, 1] - lo[1])) * span[2] + (h[:, 2] - lo[2])


def group_sort(asu_index):
    """(order, group_start): a stable permutation sorting by ASU index, and group offsets."""
    keys = pack_indices(asu_index)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if sorted_keys.size == 0:
        return order, np.zeros(1, dtype=np.int64)
    boundaries = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    group_start = np.concatenate([[0], boundaries, [sorted_keys.size]]).astype(np.int64)
    return order, group_start


def chunk_bounds(group_start, n_chunks):
    """Split groups into n_chunks contiguous ranges of about equal observation count.

    The split depends only on the data and n_chunks, so per-chunk partial sums reduced in
    chunk order make every kernel deterministic for a given nproc.
    """
    n_groups = group_start.size - 1
    n_chunks = max(1, min(int(n_chunks), max(n_groups, 1)))
    targets = np.linspace(0, group_start[-1], n_chunks + 1)[1:-1]
    inner = np.searchsorted(group_start, targets, side="left")
    bounds = np.concatenate([[0], inner, [n_groups]]).astype(np.int64)
    return np.maximum.accumulate(bounds)


@njit(cache=True, parallel=True)
def merged_intensity_kernel(intensity, weight, g, group_start, chunk_start, ih_out):
    """Ih per group; groups with sum(w g^2) = 0 get 0."""
    n_chunks = chunk_start.size - 1
    for c in prange(n_chunks):
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            s_wgi = 0.0
            s_wgg = 0.0
            for i in range(group_start[grp], group_start[grp + 1]):
                wg = weight[i] * g[i]
                s_wgi += wg * intensity[i]
                s_wgg += wg * g[i]
            ih_out[grp] = s_wgi / s_wgg if s_wgg > 0.0 else 0.0


@dataclass
class IhTable:
    """Sorted observation arrays of one or more datasets.

    intensity, variance, weight, g: per observation, sorted by group.
    dataset_id: which dataset each observation came from (position in the dataset list).
    loc_index: the row of the observation in its dataset's input arrays.
    group_start: offsets (n_groups + 1); asu_index: the ASU index of each group.
    """

    intensity: np.ndarray
    variance: np.ndarray
    weight: np.ndarray
    g: np.ndarray
    dataset_id: np.ndarray
    loc_index: np.ndarray
    group_start: np.ndarray
    asu_index: np.ndarray
    extra: dict

    @property
    def n_obs(self):
        return self.intensity.size

    @property
    def n_groups(self):
        return self.group_start.size - 1

    def group_of_observation(self):
        return np.repeat(np.arange(self.n_groups, dtype=np.int64), np.diff(self.group_start))

    def multiplicity(self):
        return np.diff(self.group_start)

    def merged_intensity(self, nproc=1):
        ih = np.empty(self.n_groups)
        merged_intensity_kernel(self.intensity, self.weight, self.g, self.group_start,
                                chunk_bounds(self.group_start, nproc), ih)
        return ih

    def select(self, obs_mask):
        """A new table with the observations in obs_mask (groups left empty vanish)."""
        keep = np.flatnonzero(obs_mask)
        group_of_obs = self.group_of_observation()[keep]
        if keep.size:
            boundaries = np.flatnonzero(group_of_obs[1:] != group_of_obs[:-1]) + 1
            group_start = np.concatenate([[0], boundaries, [keep.size]]).astype(np.int64)
            group_ids = group_of_obs[group_start[:-1]]
        else:
            group_start = np.zeros(1, np.int64)
            group_ids = np.zeros(0, np.int64)
        return IhTable(self.intensity[keep], self.variance[keep], self.weight[keep],
                       self.g[keep], self.dataset_id[keep], self.loc_index[keep], group_start,
                       self.asu_index[group_ids], {k: v[keep] for k, v in self.extra.items()})


def build_ih_table(asu_indices, intensities, variances, weights, gs, loc_indices=None,
                   extra=None):
    """An IhTable from per-dataset lists of arrays (one entry per dataset).

    extra: optional dict name -> list of per-dataset arrays carried along (e.g. partiality).
    """
    n_per = [np.asarray(a).shape[0] for a in intensities]
    if loc_indices is None:
        loc_indices = [np.arange(n, dtype=np.int64) for n in n_per]
    asu = np.concatenate([np.asarray(a, dtype=np.int32).reshape(-1, 3) for a in asu_indices])
    order, group_start = group_sort(asu)
    dataset_id = np.repeat(np.arange(len(n_per), dtype=np.int32), n_per)[order]

    def cat(arrays, dtype=np.float64):
        return np.ascontiguousarray(np.concatenate([np.asarray(a, dtype=dtype) for a in arrays])[order])

    extra_sorted = {k: cat(v) for k, v in (extra or {}).items()}
    return IhTable(cat(intensities), cat(variances), cat(weights), cat(gs), dataset_id,
                   cat(loc_indices, np.int64), group_start, asu[order][group_start[:-1]],
                   extra_sorted)


def set_num_threads(nproc):
    """Use nproc numba threads (bounded by what numba was started with)."""
    n = max(1, min(int(nproc), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
