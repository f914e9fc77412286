"""Half-dataset cross-validation on each MPI rank's own rows (issue 11; `mpiexec -n N
dials.vmerge.stats`).

halfdataset.half_dataset_statistics, with each rank holding the observations of its own
unique reflections (whole non-anomalous ASU groups: rank_partition). What it needs of all
ranks:
- the batch split: every rank gathers the distinct batches of all ranks (one buffer
  Allgatherv) and the seeded rng permutes that array, the one-process `np.unique(batch)`,
  so every rank takes the one-process halves;
- the shells: the extreme indices of all ranks' observations (what equal_volume_limits
  reads of them);
- variational: the full data's Wilson Sigma(d), which fixes the half merges, fitted over
  all ranks' groups before the repeats (rank_variational.RankWilsonPrior: the one-process
  bins and per-bin sums);
- per repeat, each rank merges the two halves of its own groups (a merge of RANK_METHODS is a
  function of each group's observations, given Sigma for variational, and the observations
  keep the one-process order within a group)
  and sends, per group of its full groupings, whether the group is in each half with its half
  merge (non-anomalous), and whether it has an anomalous difference I(+) - I(-) in each half
  with that difference (anomalous; a Bijvoet partner lies on its group's rank). Rank 0
  receives them in the one-process group order (rank_merge.RankGrouping: one Gatherv per
  grouping and repeat), so the groups that are in both halves come out in the order, with the
  values, that the one-process code correlates, and runs the one-process correlations and
  summary (halfdataset._correlations, half_dataset_summary) on them: the same bits for any N.
The result (a few dozen numbers) is broadcast to every rank.
"""

from __future__ import annotations

import numpy as np

from ..backends import mpi_world
from ..errors import VmergeError
from .groups import Groupings
from .halfdataset import _correlations, _plus, half_dataset_summary, split_batches
from .lookup import find_indices
from .rank_merge import (RankGrouping, _global_extreme_indices, _on_every_rank,
                         _raise_together)
from .rank_variational import rank_half_dataset_merger
from .statistics import equal_volume_limits, shell_of, symmetry_compatible_cell


def _present_groups(grouping, mask):
    """Positions among `grouping`'s groups of those holding a row of `mask`: the groups of
    grouping.subset(mask), in its order."""
    kept_sorted = mask[grouping.permutation]
    counted = np.zeros(kept_sorted.size + 1, dtype=np.int64)
    np.cumsum(kept_sorted, out=counted[1:])
    counts = counted[grouping.group_start[1:]] - counted[grouping.group_start[:-1]]
    return np.flatnonzero(counts > 0)


class _LocalHalves:
    """One rank's half merges of its own groups for a split of the batches."""

    def __init__(self, full, full_anom, intensity, sigma, batch, merge, space_group,
                 context=None):
        self.full, self.full_anom = full, full_anom
        self.context = context  # merge.prepare's (variational: the full data's Sigma)
        self.intensity, self.sigma, self.batch = intensity, sigma, batch
        self.merge = merge
        # Bijvoet partner and hemisphere depend on the ASU index alone: found once among
        # the full groups rather than in each half (a half's partner is the full grouping's
        # partner when that is in the half)
        self.partner = find_indices(-full_anom.asu_index, full_anom.asu_index)
        self.plus = np.flatnonzero(_plus(full_anom.asu_index, space_group)
                                   & (self.partner >= 0) & ~full_anom.centric)

    def _half(self, grouping, mask, anomalous):
        """(whether each group of `grouping` is in the half, its merge there (0 if not))."""
        present = np.zeros(grouping.n_groups)
        merged = np.zeros(grouping.n_groups)
        part = grouping.subset(mask)
        if part.n_groups:
            where = _present_groups(grouping, mask)
            present[where] = 1.0
            merged[where] = self.merge(part, self.intensity[mask], self.sigma[mask],
                                       self.context,
                                       anomalous)
        return present, merged

    def columns(self, first_batches):
        """Per group of the full non-anomalous grouping: (in half 1, merge of half 1, in
        half 2, merge of half 2); per group of the full anomalous grouping: (has an
        anomalous difference in half 1, that difference, the same for half 2). As the
        one-process code: a difference I(+) - I(-) for acentric plus-hemisphere groups
        whose Bijvoet partner is in the same half."""
        first = np.isin(self.batch, first_batches)
        half_columns, anom_columns = [], []
        plus, partner = self.plus, self.partner[self.plus]
        for mask in (first, ~first):
            half_columns.extend(self._half(self.full, mask, False))
            present, merged = self._half(self.full_anom, mask, True)
            has = np.zeros(self.full_anom.n_groups)
            delta = np.zeros(self.full_anom.n_groups)
            both = (present[plus] != 0) & (present[partner] != 0)
            has[plus[both]] = 1.0
            delta[plus[both]] = merged[plus[both]] - merged[partner[both]]
            anom_columns.extend((has, delta))
        return half_columns, anom_columns


def _all_batches(batch):
    """The one-process np.unique(batch): the sorted distinct batches of all ranks (a rank's
    groups need not hold every batch), so the seeded permutation is the one-process one."""
    return np.unique(mpi_world.allgather_rows(np.unique(batch)))


def _both_halves(grouping, columns):
    """Rank 0: of the gathered (in 1, value 1, in 2, value 2) in global order, the groups in
    both halves: (value 1, value 2, d*^2)."""
    in_1, value_1, in_2, value_2 = columns
    ok = (in_1 != 0) & (in_2 != 0)
    return value_1[ok], value_2[ok], grouping.dstar_sq[ok]


def rank_half_dataset_statistics(
    miller_index, intensity, sigma, batch, space_group, unit_cell, merge, repeats=10, seed=0,
    n_bins=20, groupings=None,
):
    """halfdataset.half_dataset_statistics of all ranks' observations, each rank giving the
    rows of its own unique reflections (whole non-anomalous groups; input order kept within
    a group); every rank returns the one-process result. `merge(groups, I, sigma, context,
    anomalous)` must merge each group from its own observations alone given `context`
    (merge.prepare's, if it has one; classical, robust: None). Variational: prepare fits
    the full data's Sigma(d) over all ranks (rank_variational.rank_half_dataset_merger
    makes the merger do so) and each half is merged with it held fixed. Every rank calls
    it."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    batch = np.asarray(batch, dtype=np.int64)
    unit_cell = symmetry_compatible_cell(unit_cell, space_group)
    extremes = _global_extreme_indices(miller_index, unit_cell)
    batches = _all_batches(batch)
    if groupings is None:
        groupings = Groupings(miller_index, space_group, unit_cell)
    full = groupings.get(False, unit_cell)
    full_anom = groupings.get(True, unit_cell)
    every = RankGrouping(full)
    every_anom = RankGrouping(full_anom)
    merge = rank_half_dataset_merger(merge)
    # as half_dataset_statistics: the merger's context from the full groupings (a collective
    # for variational: every rank fits Sigma(d) with the others)
    context = merge.prepare({"full": full, "full_anom": full_anom}, intensity, sigma) \
        if hasattr(merge, "prepare") else None
    local = _LocalHalves(full, full_anom, intensity, sigma, batch, merge, space_group,
                         context)
    error = None
    try:
        limits, d_ranges = equal_volume_limits(unit_cell, extremes, n_bins)
    except Exception as e:  # the same on every rank (global extremes)
        error, limits, d_ranges = e, None, None
    rng = np.random.default_rng(seed)
    cc_half, cc_anom = [], []
    n_half = n_anom = None
    for _ in range(int(repeats)):
        first_batches = split_batches(batches, rng)
        try:
            half_columns, anom_columns = local.columns(first_batches)
        except Exception as e:  # sent as "in neither half"; raised on every rank below
            error = error or e
            half_columns = [np.zeros(full.n_groups)] * 4
            anom_columns = [np.zeros(full_anom.n_groups)] * 4
        half_columns = every.to_global(*half_columns)
        anom_columns = every_anom.to_global(*anom_columns)
        if not mpi_world.is_output_rank() or error is not None:
            continue
        try:
            i1, i2, dstar_sq = _both_halves(every, half_columns)
            del half_columns
            values, n_half = _correlations(i1, i2, shell_of(dstar_sq, limits), n_bins)
            cc_half.append(values)
            d1, d2, dstar_sq = _both_halves(every_anom, anom_columns)
            del anom_columns
            values, n_anom = _correlations(d1, d2, shell_of(dstar_sq, limits), n_bins)
            cc_anom.append(values)
        except Exception as e:
            error = e
    result = None
    if mpi_world.is_output_rank() and error is None:
        try:
            result = half_dataset_summary(cc_half, n_half, cc_anom, n_anom, d_ranges,
                                          repeats, seed, n_bins)
        except Exception as e:
            error = e
    # every rank fails alike (the lowest failed rank's message), none is left waiting
    _raise_together(None if error is None else VmergeError(str(error)))
    return _on_every_rank(result)
