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

from ..kernels.size_dispatch import parallel_when_large


def map_indices_to_asu(miller_index, space_group, anomalous):
    """ASU indices (N,3 int32) in a cctbx space group; Friedel mates merge unless anomalous.
    (One cctbx mapping per distinct reflection where the rows allow: asu_mapping.py.)"""
    from ..asu_mapping import asu_indices

    return asu_indices(miller_index, space_group, anomalous)


@njit(cache=True)
def _pack_indices_kernel(h):
    n = h.shape[0]
    lo = np.zeros(3, np.int64)
    hi = np.zeros(3, np.int64)
    if n:
        for k in range(3):
            lo[k] = h[0, k]
            hi[k] = h[0, k]
    for i in range(n):
        for k in range(3):
            v = np.int64(h[i, k])
            if v < lo[k]:
                lo[k] = v
            if v > hi[k]:
                hi[k] = v
    span1 = hi[1] - lo[1] + 1
    span2 = hi[2] - lo[2] + 1
    keys = np.empty(n, np.int64)
    for i in range(n):
        keys[i] = ((np.int64(h[i, 0]) - lo[0]) * span1
                   + (np.int64(h[i, 1]) - lo[1])) * span2 + (np.int64(h[i, 2]) - lo[2])
    return keys


def pack_indices(asu_index):
    """One int64 key per index, ordered like (h, k, l) lexicographically."""
    h = np.asarray(asu_index)
    if h.dtype not in (np.int32, np.int64):
        h = h.astype(np.int64)
    return _pack_indices_kernel(np.ascontiguousarray(h).reshape(-1, 3))


COUNTING_SORT_SPAN_PER_ROW = 4  # the counting sort's O(span) memory stays below the rows'
COUNTING_SORT_MIN_SPAN = 1 << 20


def group_sort(asu_index):
    """(order, group_start): a stable permutation sorting by ASU index, and group offsets.

    When the packed keys span few values for the rows (always for scaling data: thousands
    of unique reflections, up to ~1e7 observations), a counting sort, O(n + span), gives the
    same permutation as the stable argsort (which took ~1.5 s per 1e7 rows)."""
    from ..kernels.group_sort import grouped_counting_sort

    keys = pack_indices(asu_index)
    if keys.size:
        span = int(keys.max()) + 1  # keys are >= 0 (packed from the lowest index)
        if span <= max(COUNTING_SORT_SPAN_PER_ROW * keys.size, COUNTING_SORT_MIN_SPAN):
            return grouped_counting_sort(keys, span)
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


@njit(cache=True)
def group_weighted_sums(intensity, weight, g, lo, hi):
    """(sum w g I, sum w g^2) over observations lo:hi, in order: Ih = the first / the second."""
    s_wgi = 0.0
    s_wgg = 0.0
    for i in range(lo, hi):
        wg = weight[i] * g[i]
        s_wgi += wg * intensity[i]
        s_wgg += wg * g[i]
    return s_wgi, s_wgg


@parallel_when_large
def merged_intensity_kernel(intensity, weight, g, group_start, chunk_start, ih_out):
    """Ih per group; groups with sum(w g^2) = 0 get 0."""
    n_chunks = chunk_start.size - 1
    for c in prange(n_chunks):
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, group_start[grp],
                                               group_start[grp + 1])
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
    # groups by the anomalous index in (unique reflection, hand) order (friedel_ordered):
    # the non-anomalous index of each group, whose key places it in the job's key blocks
    # (issue 11); None when the groups are by the non-anomalous index (asu_index itself)
    key_asu: np.ndarray = None

    @property
    def block_key_asu(self):
        """The per-group ASU indices the key blocks of a sum over groups are cut by."""
        return self.asu_index if self.key_asu is None else self.key_asu

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

    def select(self, obs_mask, consume=False, group_of_obs=None):
        """A new table with the observations in obs_mask (groups left empty vanish).

        obs_mask: a boolean mask, or ascending observation positions; group_of_obs: this
        table's group_of_observation(), when the caller selects many times.

        consume: the caller drops this table; each of its per-observation arrays is released
        as soon as its selection exists, so the two tables never coexist in full (a chain of
        filters then peaks at one table plus one column, not two tables)."""
        obs_mask = np.asarray(obs_mask)
        keep = np.flatnonzero(obs_mask) if obs_mask.dtype == bool else obs_mask
        if group_of_obs is None:
            group_of_obs = self.group_of_observation()
        group_of_obs = group_of_obs[keep]
        if keep.size:
            boundaries = np.flatnonzero(group_of_obs[1:] != group_of_obs[:-1]) + 1
            group_start = np.concatenate([[0], boundaries, [keep.size]]).astype(np.int64)
            group_ids = group_of_obs[group_start[:-1]]
        else:
            group_start = np.zeros(1, np.int64)
            group_ids = np.zeros(0, np.int64)
        del group_of_obs
        columns = {}
        for name in ("intensity", "variance", "weight", "g", "dataset_id", "loc_index"):
            values = getattr(self, name)
            columns[name] = None if values is None else values[keep]  # None: not yet formed
            if consume:
                setattr(self, name, None)
        extra = {}
        for name in list(self.extra):
            extra[name] = self.extra[name][keep]
            if consume:
                del self.extra[name]
        return IhTable(group_start=group_start, asu_index=self.asu_index[group_ids], extra=extra,
                       key_asu=None if self.key_asu is None else self.key_asu[group_ids],
                       **columns)


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


def _read_joined(parts):
    """np.concatenate(parts) for reading only: the one part itself when there is one."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def joined(arrays, dtype=np.float64):
    """Per-dataset 1-D arrays as one array in dataset order. When they are consecutive
    slices of one array (each dataset's slice of a flat per-row array: the scaling run's g
    after expand, the intensities as read), that array's span is returned without a copy;
    otherwise they are concatenated."""
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    span = _consecutive_span(arrays)
    if span is not None:
        return span
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _consecutive_span(arrays):
    """The one array whose consecutive slices `arrays` are (views of one owner, contiguous,
    each starting where the previous ends), or None."""
    filled = [a for a in arrays if a.size]
    if not filled:
        return None
    first = filled[0]
    owner = first.base if first.base is not None else first
    if not (isinstance(owner, np.ndarray) and owner.flags.c_contiguous
            and owner.dtype == first.dtype):
        return None
    begin = expected = first.__array_interface__["data"][0]
    for a in filled:
        if not (a.ndim == 1 and a.flags.c_contiguous and (a is owner or a.base is owner)
                and a.__array_interface__["data"][0] == expected):
            return None
        expected += a.nbytes
    offset = (begin - owner.__array_interface__["data"][0]) // first.itemsize
    flat = owner.reshape(-1)
    if offset < 0 or offset + (expected - begin) // first.itemsize > flat.size:
        return None
    return flat[offset:offset + (expected - begin) // first.itemsize]


class GroupLayout:
    """The group sort of a fixed set of observations, computed once and reused.

    Observations are those of several datasets (per-dataset ASU arrays, concatenated in
    dataset order); `table(...)` gathers per-dataset values into an IhTable in sorted order
    and `subset(masks)` restricts the layout to the masked observations. A stable sort
    restricted to a subset is the stable sort of that subset, so both give exactly the
    tables build_ih_table would build, without sorting again.
    """

    def __init__(self, asu_indices, loc_indices=None, full_sizes=None):
        """asu_indices: per dataset. loc_indices: each observation's row in its dataset's
        arrays (default: its position). full_sizes: the lengths of the per-dataset arrays
        `gather` will take, when the observations are only some rows of them (then
        loc_indices are required); equals `GroupLayout(all rows).subset(masks)`."""
        n_per = [np.asarray(a).reshape(-1, 3).shape[0] for a in asu_indices]
        self.offsets = np.concatenate([[0], np.cumsum(n_per)]).astype(np.int64)
        # one dataset's arrays are read in place, not copied (this sort is the peak of the
        # error-model step; the anomalous layout of a 1e6 sweep)
        asu = _read_joined([np.asarray(a, dtype=np.int32).reshape(-1, 3) for a in asu_indices])
        self.order, self.group_start = group_sort(asu)
        self.group_asu = asu[self.order[self.group_start[:-1]]]
        del asu
        self.dataset_id = np.repeat(np.arange(len(n_per), dtype=np.int32), n_per)[self.order]
        if loc_indices is None and len(n_per) == 1:
            # one dataset: each observation's row in it is its position, order itself (one
            # array for both: the layout lives through the whole run; issue 10, memory)
            local = self.order
        elif loc_indices is None:
            local = self.order - self.offsets[self.dataset_id]
        else:
            local = _read_joined([np.asarray(a, dtype=np.int64) for a in loc_indices])[
                self.order]
        self.loc_index = local if local is self.order else np.ascontiguousarray(
            local, dtype=np.int64)
        if full_sizes is not None:
            self.offsets = np.concatenate([[0], np.cumsum(full_sizes)]).astype(np.int64)
            self.order = self.offsets[self.dataset_id] + self.loc_index
        self.key_asu = None

    @property
    def n_obs(self):
        return self.order.size

    def friedel_ordered(self, space_group):
        """This layout of groups by the ANOMALOUS index with its groups put in (unique
        reflection, hand) order: I(+) then I(-) of one non-anomalous ASU index, unique
        reflections in (h, k, l) order; observations within a group keep their order.
        key_asu holds each group's non-anomalous index.

        Why (issue 11): in the (h, k, l) order of the anomalous indices the I(-) groups of
        one range of unique reflections lie among the I(+) groups of another, so an MPI
        rank's groups (whole non-anomalous ASU groups of its key range) are not a contiguous
        run of the one-process order, and sums over groups by the job's key blocks
        (block_sums.key_block_sum) cannot be cut by key. In this order they are; every run,
        one process included, uses it (the same order as error_model.friedel_pair_layout).
        Only the G group indices are mapped (not every observation's)."""
        permutation, key_asu = friedel_group_order(self.group_asu, space_group)
        return self._groups_permuted(permutation, key_asu)

    def _groups_permuted(self, permutation, key_asu):
        """The layout with group permutation[j] as its group j (key_asu: the per-group
        non-anomalous indices in the new group order)."""
        rows, group_start = permuted_group_rows(self.group_start, permutation)
        out = GroupLayout.__new__(GroupLayout)
        out.offsets = self.offsets
        out.order = self.order[rows]
        out.group_start = group_start
        out.group_asu = self.group_asu[permutation]
        out.key_asu = key_asu
        out.dataset_id = self.dataset_id[rows]
        out.loc_index = out.order if self.loc_index is self.order else self.loc_index[rows]
        return out

    def gather(self, arrays, dtype=np.float64):
        """Per-dataset arrays -> one array in sorted observation order."""
        source = joined(arrays, dtype)
        if source.shape[0] < self.offsets[-1]:
            raise IndexError(f"gather: {source.shape[0]} values for a layout over "
                             f"{self.offsets[-1]} rows")
        # np.take into a new array: the same values as source[order], ~40% quicker than
        # the fancy index (~50 gathers of 1e6 values in a sweep's run; issue 10). The order
        # lies below offsets[-1] by construction, so 'clip' never clips ('raise' buffers).
        out = np.empty((self.order.size,) + source.shape[1:], dtype=source.dtype)
        np.take(source, self.order, axis=0, out=out, mode="clip")
        return out

    def table(self, intensities, variances, weights, gs, extra=None):
        return IhTable(self.gather(intensities), self.gather(variances), self.gather(weights),
                       self.gather(gs), self.dataset_id, self.loc_index, self.group_start,
                       self.group_asu, {k: self.gather(v) for k, v in (extra or {}).items()},
                       getattr(self, "key_asu", None))

    def subset(self, masks):
        """The layout of the observations selected by per-dataset boolean masks; `gather`
        then takes the full per-dataset arrays (unmasked), loc_index stays the row in them."""
        keep_flat = np.concatenate([np.asarray(m, dtype=bool) for m in masks])
        keep_sorted = keep_flat[self.order]
        out = GroupLayout.__new__(GroupLayout)
        out.offsets = self.offsets
        out.order = self.order[keep_sorted]
        group_of_obs = np.repeat(np.arange(self.group_start.size - 1, dtype=np.int64),
                                 np.diff(self.group_start))[keep_sorted]
        if group_of_obs.size:
            boundaries = np.flatnonzero(group_of_obs[1:] != group_of_obs[:-1]) + 1
            out.group_start = np.concatenate([[0], boundaries, [group_of_obs.size]]).astype(
                np.int64)
            out.group_asu = self.group_asu[group_of_obs[out.group_start[:-1]]]
            out.key_asu = None if getattr(self, "key_asu", None) is None else \
                self.key_asu[group_of_obs[out.group_start[:-1]]]
        else:
            out.group_start = np.zeros(1, np.int64)
            out.group_asu = np.zeros((0, 3), np.int32)
            out.key_asu = None if getattr(self, "key_asu", None) is None else \
                np.zeros((0, 3), np.int32)
        out.dataset_id = self.dataset_id[keep_sorted]
        out.loc_index = out.order if self.loc_index is self.order else \
            self.loc_index[keep_sorted]
        return out


def friedel_group_order(group_asu, space_group):
    """(permutation, key_asu) putting groups of anomalous ASU indices `group_asu` (distinct)
    in (unique reflection, hand) order: I(+) then I(-) of one non-anomalous ASU index, unique
    reflections in (h, k, l) order (GroupLayout.friedel_ordered); key_asu: the non-anomalous
    index of each group in that order. Only the groups' indices are mapped."""
    from ..backends.rank_partition import packed_keys

    group_asu = np.asarray(group_asu).reshape(-1, 3)
    if not group_asu.shape[0]:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int32)
    merged = np.asarray(map_indices_to_asu(group_asu, space_group, False), dtype=np.int32)
    hand = np.any(merged != group_asu, axis=1)
    # a sort of (key, hand) pairs, unique per group (2 key + hand could pass 63 bits)
    permutation = np.lexsort((hand, packed_keys(merged)))
    return permutation, merged[permutation]


def permuted_group_rows(group_start, permutation):
    """(rows, new group_start): the observation positions, in the old order, of the groups
    taken in `permutation` order (each group's observations keep their order)."""
    sizes = np.diff(group_start)[permutation]
    new_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # observation i of new group j is observation i - new_start[j] of old group
    # permutation[j], which starts at group_start[permutation[j]]
    rows = np.repeat(group_start[:-1][permutation] - new_start[:-1], sizes) \
        + np.arange(int(new_start[-1]), dtype=np.int64)
    return rows, new_start


def set_num_threads(nproc):
    """Use nproc numba threads (bounded by what numba was started with)."""
    n = max(1, min(int(nproc), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
