"""Variational merging on each MPI rank's own rows (issue 11; variational-merging.md 7.3).

The posterior of a unique reflection given the Wilson Sigma(d) is a function of its own
observations (kernels/merging.py posterior_kernel), so each rank merges its own groups.
Sigma(d) is fitted by EM over all groups, in resolution bins of equal counts in 1/d^2; the
steps that read every group (variational.WilsonPrior) are taken over the ranks here with
the one-process bits:

- the bins: an order statistic of 1/d^2 over all groups, ties broken by the group order.
  Each rank sends its groups' packed ASU keys and 1/d^2 to rank 0 (one value per unique
  reflection, as rank_merge already gathers), which puts them in the one-process group order
  (ascending keys; for the anomalous grouping this interleaves the ranks' groups), bins them
  with variational.resolution_bins and sends each rank its groups' bins (Scatterv);
- per EM iteration, the per-bin means of E[J]/eps: each rank computes its groups' E[J]/eps,
  rank 0 gathers them, puts them in the group order and adds them with the one-process
  bincount, and broadcasts the per-bin means (n_bins values). The floor of the first step (a
  mean over all groups with E[J] > 0) likewise;
- convergence: every rank computes the change from the same broadcast arrays, so every rank
  takes the same decision after the same iteration.

Ranks other than 0 hold no array over all groups; rank 0 holds four per-group arrays (keys,
1/d^2, the bins, one gathered iteration). With the bins and Sigma identical and each group's
posterior computed from the same observations in the same order, each group's merged values
are the one-process values, bit for bit, for any N.
"""

from __future__ import annotations

import numpy as np

from ..backends import mpi_world
from .api import HalfDatasetMerger, MethodMerger, merge_groups
from .lookup import find_indices
from .variational import WilsonPrior, _positive_floor, bin_means, resolution_bins


class RankWilsonPrior(WilsonPrior):
    """variational.WilsonPrior over every rank's groups, each rank giving its own (whole
    groups of a key range: backends/rank_partition.py). Every rank calls each method in the
    same order (collectives); one instance per merge."""

    def bins(self, groups, n_bins):
        from ..backends.rank_partition import packed_keys

        self.rows_per_rank = mpi_world.allgather_rows(
            np.array([groups.n_groups], dtype=np.int64))
        keys = mpi_world.gather_rows_to_output_rank(packed_keys(groups.asu_index))
        dstar_sq = mpi_world.gather_rows_to_output_rank(
            np.ascontiguousarray(groups.dstar_sq, dtype=np.float64))
        output = mpi_world.is_output_rank()
        # order[j]: the gathered (rank-order) row of the j-th group in the one-process order
        self.order = np.argsort(keys, kind="stable") if output else None
        del keys
        n_used = np.zeros(1, dtype=np.int64)
        in_rank_order = None
        if output:
            self.bin_of = resolution_bins(dstar_sq[self.order], n_bins)
            n_used[0] = int(self.bin_of.max()) + 1 if len(self.bin_of) else 0
            in_rank_order = np.empty_like(self.bin_of)
            in_rank_order[self.order] = self.bin_of
        del dstar_sq
        n_used = int(mpi_world.broadcast_from_output_rank(n_used, np.int64)[0])
        local = mpi_world.scatter_rows_from_output_rank(in_rank_order, self.rows_per_rank,
                                                        np.int64)
        return np.ascontiguousarray(local, dtype=np.int64), n_used

    def _in_group_order(self, values):
        """Rank 0: every rank's per-group `values` in the one-process group order; None on
        the other ranks."""
        gathered = mpi_world.gather_rows_to_output_rank(
            np.ascontiguousarray(values, dtype=np.float64))
        return gathered[self.order] if mpi_world.is_output_rank() else None

    def start(self, values, bin_of, n_used_bins):
        every = self._in_group_order(values)
        row = None
        if every is not None:
            row = np.append(bin_means(every, self.bin_of, n_used_bins), _positive_floor(every))
        row = mpi_world.broadcast_from_output_rank(row, np.float64)
        return row[:-1].copy(), float(row[-1])

    def update(self, values, bin_of, n_used_bins):
        every = self._in_group_order(values)
        means = None if every is None else bin_means(every, self.bin_of, n_used_bins)
        return mpi_world.broadcast_from_output_rank(means, np.float64).copy()


def merge_variational_rank_rows(groups, intensity, sigma, params):
    """merging.api.merge_groups("variational", ...) of all ranks' groups, each rank giving
    (and getting the merge of) its own, without French-Wilson (not applied to variational
    merges). Every rank calls it."""
    return merge_groups("variational", groups, intensity, sigma, params,
                        french_wilson_amplitudes=False, wilson_prior=RankWilsonPrior())


def median_of_binned(values, counts):
    """np.median of the multiset holding counts[b] copies of values[b] (NaN if empty), from
    the bins alone."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0 or np.isnan(values[counts > 0]).any():
        return float("nan")
    order = np.argsort(values, kind="stable")
    ends = np.cumsum(counts[order])

    def element(k):  # the k-th smallest (0-based)
        return values[order[int(np.searchsorted(ends, k, side="right"))]]

    if n % 2:
        return float(element(n // 2))
    # np.median's even case: the mean of the two middle elements
    return float(np.mean(np.array([element(n // 2 - 1), element(n // 2)])))


class RankMethodMerger(MethodMerger):
    """api.MethodMerger for rank_merge.RankPrepared: `full` are this rank's share of the
    variational merges of all ranks' groups (merge_variational_rank_rows), so a grouping of
    this rank's rows equal to one of them gets its values, and any other (a resolution cut,
    a CC1/2 half: subsets of this rank's groups) is merged with the full data's Sigma held
    fixed, each group by itself (no collective). A group outside the full merge would take
    the median of the full data's per-group Sigma, as in one process: computed here from
    the Sigma bins and their counts over all ranks (every rank constructs the merger)."""

    def __init__(self, method, params, full):
        super().__init__(method, params, full)
        self.median = {}
        for merged in full:
            extra = merged.extra
            counts = np.bincount(extra["bin_of"], minlength=len(extra["wilson_sigma_bins"]))
            counts = mpi_world.allgather_rows(counts[None, :].astype(np.int64)).sum(axis=0)
            self.median[merged.anomalous] = median_of_binned(extra["wilson_sigma_bins"],
                                                             counts)

    def _merge(self, groups, intensity, sigma):
        full = self.full[groups.anomalous]
        where = find_indices(groups.asu_index, full.asu_index)
        values = full.extra["wilson_sigma_per_group"]
        sigma_per_group = np.where(where >= 0, values[np.maximum(where, 0)] if len(values)
                                   else np.nan, self.median[groups.anomalous])
        return merge_groups(self.method, groups, intensity, sigma, self.params,
                            french_wilson_amplitudes=False,
                            wilson_sigma_per_group=sigma_per_group)


def rank_half_dataset_merger(merge):
    """The half-dataset merger for rank_halfdataset: a variational HalfDatasetMerger fits its
    full-data Sigma over all ranks (RankWilsonPrior); others as given."""
    if (isinstance(merge, HalfDatasetMerger) and merge.method == "variational"
            and merge.wilson_prior is None):
        return HalfDatasetMerger(merge.method, merge.params, wilson_prior=RankWilsonPrior)
    return merge
