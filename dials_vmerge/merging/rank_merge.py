"""Merging and merging statistics on each MPI rank's own rows (issue 11).

Under `mpiexec -n N dials.vmerge.merge` (N > 1, merging.method=classical, robust or
variational, host passes; dials.vmerge's merging stage and dials.vmerge.stats too, the latter
with the half-dataset cross-validation of rank_halfdataset.py and, for several methods, each
method in turn) every rank reads only the rows of its
own unique reflections (backends/rank_partition.py: whole non-anomalous ASU groups, so I(+),
I(-) and the Friedel-merged group of a reflection are all on one rank) and computes per-group
values of its own groups only. What crosses ranks is one row of values per unique reflection
(buffer Gatherv of float64 rows to rank 0), never an observation of the merge or the
statistics:

- merged.mtz: each rank's merges (Friedel mates together and apart) gathered to rank 0 in
  the one-process group order ((h, k, l) of the ASU index), French-Wilson on the gathered
  values (its prior is by resolution shell, a global quantity; not for variational, whose
  amplitudes are its posterior's and are gathered). Variational: the Wilson Sigma(d) of the
  merges is fitted by EM over every rank's groups (rank_variational.py: the bins and per-bin
  sums on rank 0 from one gathered value per group per iteration); the statistics' subsets
  and halves are merged with it held fixed (rank_variational.RankMethodMerger).
- statistics (statistics.merging_statistics's definitions and shell code, unchanged): the
  per-group sums of statistics._Prepared (merged I and sigma, sum |I - <I>|, sum I, the
  anomalous merge) are computed by each rank for its groups and gathered to rank 0 alone,
  which takes every shell sum, completeness count, CC and fit from them and broadcasts the
  resulting MergingStatistics; the other ranks hold no array over all groups.
- CC1/2 and CCanom: cctbx's random half-split is one stream over the groups of a shell in
  group order. How many draws a group takes depends only on its multiplicity and, for odd
  multiplicity, on the stream value at its first draw, so rank 0 scans the gathered
  multiplicities (_draw_offsets) to find where in the stream each group starts and sends
  each rank its groups' places (RankPrepared.half_means; the other ranks wait in
  RankPrepared.serve); each rank draws the halves of its own groups from there with the
  one-process code (statistics.half_means_from_draw_starts) and the half means go back to
  rank 0. The halves are thus the one-process halves.

Within a group the observations are in the one-process order (a rank's rows keep input
order), so each group's values, and hence merged.mtz and the statistics, are bit-identical
for any N. The merged reflections go to rank 0 alone (it writes merged.mtz; the other
ranks' results hold none). The report-only summaries (sigma calibration, statistics against
batch, merge diagnostics) are made on rank 0 from parts each rank computes for its own
groups (_LocalReportParts: per-batch sums continued rank after rank, histogram counts added,
the deviations the summaries sort, per-group values), not from the observations. Still
gathered to rank 0 per observation: the unmerged MTZ's columns, when it is asked for.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numba import njit

from ..backends import mpi_world
from ..errors import VmergeError
from . import statistics as st
from .api import (MergeResult, ScaledObservations, _param, merge_groups, scaled_observations,
                  single_method)
from .classical import SIGMA_DYNAMIC_RANGE, deviation_sums, merge_sums
from .groups import Groupings, per_index_chunks
from .merged import MergedIntensities
from .statistics import half_labels_from_draw_starts, half_means_from_draw_starts


# Methods merged on each rank's own rows: classical and robust merge each group from its own
# observations; variational too given the Wilson Sigma(d), whose EM fit over all groups takes
# its all-group steps over the ranks (merging/rank_variational.py).
RANK_METHODS = ("classical", "robust", "variational")


def applies(params, n_ranks: int) -> bool:
    """True when the merge runs on each rank's own rows: more than one rank and a
    merging.method of RANK_METHODS. With compute.device=cuda each rank's groups are merged on
    its device (classical.merge_sums / deviation_sums: a thread per group, so the values do
    not depend on the split); the statistics' sums over groups run on the host here
    (statistics._device_sums is off for the distributed preparation)."""
    method = _param(params, "merging.method", ["classical"])
    method = [method] if isinstance(method, str) else list(method)
    return n_ranks > 1 and len(method) == 1 and method[0] in RANK_METHODS


def merge_scaled_table(table, experiments, params, log=None, half_dataset=False) -> MergeResult:
    """merging.api.merge_scaled_table; under MPI, when `applies`, on each rank's own rows
    (the merge and stats programs and dials.vmerge's merging stage all come here)."""
    from ..backends.rank_local import holds_own_rows

    if applies(params, mpi_world.n_ranks()):
        return merge_rank_rows(table, experiments, params, log, half_dataset=half_dataset)
    if holds_own_rows(table):
        # a rank-local scaling job must only be switched on where its merge is too
        # (pipeline's predicate includes `applies`): no rank holds the other ranks' rows
        raise VmergeError("internal error: a rank-local scaled table cannot be merged with "
                          "these merging parameters (one merging.method of "
                          + ", ".join(RANK_METHODS) + " on the host only)")
    from .api import merge_scaled_table as merge_every_row

    return merge_every_row(table, experiments, params, log, half_dataset=half_dataset)


# -- collective error handling ----------------------------------------------------------------
def _raise_together(error):
    """Every rank calls this with the VmergeError it met (or None); if any rank met one, all
    raise the lowest such rank's message, so that ranks whose rows hold the bad values and
    ranks whose rows do not stop alike (one line, exit 1, as in one process)."""
    comm = mpi_world.world()
    if comm is None:
        if error is not None:
            raise error
        return
    messages = comm.allgather(None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise VmergeError(first)


# -- groupings gathered to rank 0 -------------------------------------------------------------
class RankGrouping:
    """A grouping's per-group values over all ranks, in the one-process group order, on rank 0
    alone (the other ranks hold only their own groups: `local`), with where each group lives.

    On rank 0 it has what the statistics' shell code reads of a GroupedObservations:
    centric, dstar_sq, multiplicity, n_groups, anomalous, derived (not the ASU indices: what
    the statistics derive from them, d and the Bijvoet partners, each rank derives for its
    own groups and they are gathered as values). On the other ranks those are None, apart
    from n_groups, anomalous and local."""

    def __init__(self, local):
        from ..backends.rank_partition import packed_keys

        self.local = local
        self.anomalous = local.anomalous
        self.derived = {}
        counts = mpi_world.allgather_rows(np.array([local.n_groups], dtype=np.int64))
        self._n_groups = int(counts.sum())
        # group k of rank r is at position rank_first[r] + k of the rows gathered in rank order
        self.rank_first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        keys = mpi_world.gather_rows_to_output_rank(packed_keys(local.asu_index))
        self.order = self.owner = None
        if mpi_world.is_output_rank():
            # the one-process grouping's order: ASU indices in (h, k, l) order, i.e. the
            # order of their packed keys (unique)
            self.order = np.argsort(keys, kind="stable")
            self.owner = np.repeat(np.arange(counts.size, dtype=np.int32), counts)[self.order]
        del keys
        centric, self.dstar_sq, multiplicity = self.to_global(
            local.centric, local.dstar_sq, local.multiplicity)
        self.centric = None if centric is None else centric != 0
        self.multiplicity = None if multiplicity is None else multiplicity.astype(np.int64)

    @property
    def n_groups(self) -> int:
        return self._n_groups

    def local_index(self, global_groups):
        """Rank 0: each of the global groups' index among its owner's own groups."""
        return self.order[global_groups] - self.rank_first[self.owner[global_groups]]

    def to_global(self, *local_values):
        """Per-group float64 arrays of this rank's groups -> on rank 0, the arrays over all
        groups in global order; None on the other ranks."""
        # one Gatherv per array, each put in global order as it arrives: rank 0 holds the
        # ordered arrays and one gathered array, not a matrix of all of them and its columns
        out = []
        for values in local_values:
            gathered = mpi_world.gather_rows_to_output_rank(
                np.ascontiguousarray(values, dtype=np.float64))
            out.append(gathered[self.order] if mpi_world.is_output_rank() else None)
            del gathered
        return out

    def bijvoet_pairs(self, space_group):
        """(statistics.bijvoet_partner, its plus hemisphere with a partner) of all groups in
        global order on rank 0 (None, None on the others): a group's partner is on its rank
        (Friedel mates share the non-anomalous key), so each rank finds its own groups'
        partners and sends their positions in the rank-ordered rows."""
        partner = st.bijvoet_partner(self.local.asu_index)
        plus = st.is_plus_hemisphere(self.local.asu_index, space_group) & (partner >= 0)
        partner = np.where(partner >= 0, partner + self.rank_first[mpi_world.rank()], -1)
        partner, plus = self.to_global(partner, plus)
        if partner is None:
            return None, None
        partner = partner.astype(np.int64)
        global_of_gathered = np.empty(self.order.size, dtype=np.int64)
        global_of_gathered[self.order] = np.arange(self.order.size, dtype=np.int64)
        found = partner >= 0
        partner[found] = global_of_gathered[partner[found]]
        return partner, plus != 0


@njit(cache=True)
def _draw_offsets(multiplicity, uniforms):
    """Where in cctbx's split stream each group's draws start when the groups are split in
    the given order (statistics._draw_first_half's consumption: none for n < 2; for odd n
    one draw for the extra member's half, then one per member of the first half)."""
    out = np.zeros(multiplicity.shape[0], np.int64)
    u = np.int64(0)
    for k in range(multiplicity.shape[0]):
        out[k] = u
        n = multiplicity[k]
        if n < 2:
            continue
        n_first = n // 2
        if 2 * n_first != n:
            if uniforms[u] < 0.5:
                n_first += 1
            u += 1
        u += n_first
    return out


# what rank 0 asks of the other ranks while it runs the shell code (RankPrepared.serve)
_REQUEST_DONE, _REQUEST_HALF_MEANS = 0, 1


class RankPrepared:
    """statistics._Prepared over all ranks: the same per-group arrays, each rank computing
    its own groups' values, gathered in global group order to rank 0, which alone runs the
    shell code (the other ranks hold no array over all groups). `half_means` replaces the
    one-process half split (statistics._half_means asks for it): rank 0 sends each rank its
    groups' places in the random stream, the ranks draw their own groups' halves and send
    back the means; the other ranks wait for such requests in `serve`."""

    complete_set_dstar_sq = st._Prepared.complete_set_dstar_sq
    distributed = True

    def __init__(self, intensity, sigma, space_group, unit_cell, anomalous, groupings,
                 method="classical", params=None, merger=None):
        # merger: the method's merges of this rank's groupings (rank_variational.
        # RankMethodMerger; None: merge_groups of each grouping, for methods that merge each
        # group from its own observations). The statistics' one-process merger hooks
        # (self.merger) stay unused.
        self.method_merger = merger
        self.merger = None
        self.method = method
        self.params = params
        self.space_group = space_group
        self.unit_cell = unit_cell
        self.anomalous = anomalous
        self.intensity = intensity
        self.sigma = sigma
        self.error = None  # the first exception met while answering rank 0's requests
        a_local = groupings.get(True, unit_cell)
        g_local = groupings.get(anomalous, unit_cell)
        self.anom = RankGrouping(a_local)
        self.groups = self.anom if g_local is a_local else RankGrouping(g_local)
        mean, merged_sigma, abs_dev, total = self._local_sums(g_local, False, True)
        self.mean, self.merged_sigma, self.abs_dev, self.total = self.groups.to_global(
            mean, merged_sigma, abs_dev, total)
        anom_mean, anom_sigma, _, _ = self._local_sums(a_local, True, False)
        self.anom_mean, self.anom_sigma_internal = self.anom.to_global(anom_mean, anom_sigma)
        del mean, merged_sigma, abs_dev, total, anom_mean, anom_sigma
        self.n = self.groups.multiplicity
        (self.group_d,) = self.groups.to_global(st._cctbx_d(unit_cell, g_local.asu_index))
        self.partner, self.plus = self.anom.bijvoet_pairs(space_group)
        # statistics._Prepared's stream length (a sum of integers: exact in float64)
        needed = [mpi_world.sum_over_ranks(float(st.cctbx_draws_needed(local)))
                  for local in (g_local, a_local)]
        self.uniforms = st.cctbx_uniform_stream(int(max(needed)))
        self._complete = None

    def _local_sums(self, local, use_internal_variance, deviations):
        i_sorted = local.gather(self.intensity)
        s_sorted = local.gather(self.sigma)
        if self.method == "classical":
            mean, merged_sigma = merge_sums(i_sorted, s_sorted, local.group_start,
                                            SIGMA_DYNAMIC_RANGE, use_internal_variance)
        elif self.method_merger is not None:
            mean, merged_sigma = self.method_merger.merge(local, self.intensity, self.sigma)
        else:  # statistics of the method's merged intensities (api.MethodMerger)
            merged = merge_groups(self.method, local, self.intensity, self.sigma, self.params,
                                  french_wilson_amplitudes=False)
            mean, merged_sigma = merged.intensity, merged.sigma
        if deviations:
            abs_dev, total = deviation_sums(i_sorted, local.group_start, mean)
        else:
            abs_dev = total = np.zeros(local.n_groups)
        return mean, merged_sigma, abs_dev, total

    def half_means(self, groups, order, weighted):
        """Rank 0: means of cctbx's random halves of the groups `order` (global indices, in
        the order split), NaN for n < 2. Each group's place in the one stream comes from
        the multiplicities of the groups before it; the requests go to the ranks grouped by
        rank, each rank's in `order`'s order, and the means come back the same way."""
        order = np.asarray(order, dtype=np.int64)
        owner = groups.owner[order]
        by_rank = np.argsort(owner, kind="stable")
        rows_per_rank = np.bincount(owner, minlength=mpi_world.n_ranks())
        del owner
        requests = np.empty((order.size, 2), dtype=np.int64)
        requests[:, 0] = groups.local_index(order[by_rank])
        requests[:, 1] = _draw_offsets(groups.multiplicity[order], self.uniforms)[by_rank]
        mpi_world.broadcast_from_output_rank(
            np.array([_REQUEST_HALF_MEANS, groups is self.anom, weighted]), np.int64)
        halves = self._answer_half_means(groups, requests, rows_per_rank, weighted)
        del requests
        half_1 = np.empty(order.size)
        half_2 = np.empty(order.size)
        half_1[by_rank] = halves[:, 0]
        half_2[by_rank] = halves[:, 1]
        return half_1, half_2

    def serve(self):
        """Ranks other than 0: answer rank 0's requests until it is done."""
        while True:
            request = mpi_world.broadcast_from_output_rank(None, np.int64)
            if request[0] == _REQUEST_DONE:
                return
            groups = self.anom if request[1] else self.groups
            self._answer_half_means(groups, None, None, bool(request[2]))

    def stop_serving(self):
        """Rank 0: the other ranks leave `serve`."""
        mpi_world.broadcast_from_output_rank(np.array([_REQUEST_DONE, 0, 0]), np.int64)

    def _answer_half_means(self, groups, requests, rows_per_rank, weighted):
        """Every rank: its share of rank 0's requests (local group, stream position) ->
        the half means of those of its own groups, gathered to rank 0 in rank order. A
        failure gives NaN rows and is kept in self.error (every rank reports it after the
        shell code, so no rank is left waiting)."""
        mine = mpi_world.scatter_rows_from_output_rank(requests, rows_per_rank, np.int64, (2,))
        local = groups.local
        local_order = np.ascontiguousarray(mine[:, 0])
        starts = np.ascontiguousarray(mine[:, 1])
        del mine
        try:
            if self.method == "classical":
                h1, h2 = half_means_from_draw_starts(self.intensity, self.sigma,
                                                     local.permutation, local.group_start,
                                                     local_order, self.uniforms, weighted,
                                                     starts)
            else:
                h1, h2 = self._method_half_means(local, local_order, starts)
        except Exception as e:
            self.error = self.error or e
            h1 = h2 = np.full(local_order.size, np.nan)
        return mpi_world.gather_rows_to_output_rank(np.column_stack([h1, h2]))

    def _method_half_means(self, local, local_order, starts):
        """statistics._half_means with a method merger, on this rank's groups: the method's
        merge of each of the same random halves."""
        from .lookup import find_indices

        label = half_labels_from_draw_starts(local.permutation, local.group_start, local_order,
                                             self.uniforms, len(self.intensity), starts)
        halves = []
        for half in (1, 2):
            keep = label == half
            part = local.subset(keep)
            if self.method_merger is not None:
                means = self.method_merger.half_means(part, self.intensity[keep],
                                                      self.sigma[keep])
            else:
                means = merge_groups(self.method, part, self.intensity[keep],
                                     self.sigma[keep], self.params,
                                     french_wilson_amplitudes=False).intensity
            out = np.full(local_order.size, np.nan)
            where = find_indices(local.asu_index[local_order], part.asu_index)
            found = where >= 0
            out[found] = means[where[found]]
            out[local.multiplicity[local_order] < 2] = np.nan
            halves.append(out)
        return halves[0], halves[1]


def _global_extreme_indices(miller_index, unit_cell):
    """The indices of the smallest and largest d*^2 over all ranks' observations (what
    statistics.equal_volume_limits reads of them)."""
    row = np.zeros((1, 9), dtype=np.float64)
    if len(miller_index):
        d_star_sq = per_index_chunks(miller_index, unit_cell.d_star_sq)
        lo, hi = int(np.argmin(d_star_sq)), int(np.argmax(d_star_sq))
        row[0] = [1, d_star_sq[lo], *miller_index[lo], d_star_sq[hi], *miller_index[hi]]
    rows = mpi_world.allgather_rows(row)
    rows = rows[rows[:, 0] > 0]
    if rows.size == 0:
        return np.zeros((0, 3), dtype=np.int32)
    lo = rows[int(np.argmin(rows[:, 1])), 2:5]
    hi = rows[int(np.argmax(rows[:, 5])), 6:9]
    return np.array([lo, hi], dtype=np.int32)


def _shell_tables(prep, limits, d_ranges, n_bins, anomalous, significance_level, method):
    """Rank 0: statistics.merging_statistics's shell code on the gathered arrays (overall,
    shells, the CC1/2 fit), without the anomalous and cut tables."""
    g, a = prep.groups, prep.anom
    complete_dss = prep.complete_set_dstar_sq(float(prep.group_d.min()))
    anom_complete_dss = st._acentric_complete(prep, float(prep.group_d.min())) if anomalous \
        else None
    overall = st._shell_statistics(prep, np.ones(g.n_groups, bool), np.ones(a.n_groups, bool),
                                   None, significance_level, complete_dss, anom_complete_dss,
                                   probability_plot=True)
    group_shell = st.shell_of(g.dstar_sq, limits)
    anom_shell = st.shell_of(a.dstar_sq, limits)
    shells = []
    for b in range(n_bins):
        sel = group_shell == b
        if not sel.any():
            shells.append(st.ShellStatistics(d_max=d_ranges[b][0], d_min=d_ranges[b][1]))
            continue
        shells.append(st._shell_statistics(prep, sel, anom_shell == b, d_ranges[b],
                                           significance_level, complete_dss,
                                           anom_complete_dss))
    weights = np.array([s.cc_half_n_refl for s in shells], dtype=np.float64)
    values = np.array([s.cc_half for s in shells])
    cc_half_overall = float((weights * values).sum() / weights.sum()) if weights.sum() else 0.0
    result = st.MergingStatistics(overall=overall, shells=shells, anomalous=anomalous,
                                  n_bins=n_bins, cc_half_overall=cc_half_overall)
    result.method = method
    result.d_min_cc_half_fit = st.cc_half_resolution_estimate(result)
    return result


def _on_every_rank(statistics):
    """Rank 0's MergingStatistics (a few dozen shells) on every rank: pickled, one buffer
    broadcast of the bytes."""
    import pickle

    payload = None
    if mpi_world.is_output_rank():
        payload = np.frombuffer(pickle.dumps(statistics), dtype=np.uint8)
    payload = mpi_world.broadcast_from_output_rank(payload, np.uint8)
    return pickle.loads(payload.tobytes())


def rank_merging_statistics(miller_index, intensity, sigma, space_group, unit_cell,
                            n_bins=20, anomalous=False, significance_level=0.01,
                            with_anomalous_table=False, suggest_cut=True, groupings=None,
                            method="classical", params=None, merger=None):
    """statistics.merging_statistics of all ranks' observations, each rank giving its own
    rows (whole groups); every rank returns the same MergingStatistics (made on rank 0 while
    the other ranks answer its half-split requests). method: whose merged intensities the
    statistics describe (classical: cctbx's inverse-variance means; robust: as
    api.MethodMerger; variational: with `merger`, rank_variational.RankMethodMerger)."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    unit_cell = st.symmetry_compatible_cell(unit_cell, space_group)
    extremes = _global_extreme_indices(miller_index, unit_cell)
    if groupings is None:
        groupings = Groupings(miller_index, space_group, unit_cell)
    positive = sigma > 0
    if positive.all():
        used, used_intensity, used_sigma = groupings, intensity, sigma
    else:
        used = groupings.subset(positive)
        used_intensity, used_sigma = intensity[positive], sigma[positive]
    prep = RankPrepared(used_intensity, used_sigma, space_group, unit_cell, anomalous, used,
                        method, params, merger)
    if prep.groups.n_groups == 0:  # known to every rank
        raise ValueError("no reflections with sigma > 0")
    result = None
    if mpi_world.is_output_rank():
        try:
            limits, d_ranges = st.equal_volume_limits(unit_cell, extremes, n_bins)
            result = _shell_tables(prep, limits, d_ranges, n_bins, anomalous,
                                   significance_level, method)
        except Exception as e:
            prep.error = prep.error or e
        prep.stop_serving()
    else:
        prep.serve()
    error = prep.error
    del prep, used, used_intensity, used_sigma
    # every rank fails alike (the lowest failed rank's message), none is left waiting
    _raise_together(None if error is None else VmergeError(str(error)))
    result = _on_every_rank(result)
    if with_anomalous_table and not anomalous:
        result.anomalous_statistics = rank_merging_statistics(
            miller_index, intensity, sigma, space_group, unit_cell, n_bins, True,
            significance_level, False, suggest_cut=False, groupings=groupings, method=method,
            params=params, merger=merger)
    d_fit = result.d_min_cc_half_fit
    if (suggest_cut and d_fit is not None
            and d_fit - result.shells[-1].d_min > st.CUT_TOLERANCE_A):
        keep = np.sqrt(per_index_chunks(miller_index, unit_cell.d_star_sq)) <= 1.0 / d_fit
        result.cut_statistics = rank_merging_statistics(
            miller_index[keep], intensity[keep], sigma[keep], space_group, unit_cell, n_bins,
            anomalous, significance_level, with_anomalous_table, suggest_cut=False,
            groupings=groupings.subset(keep), method=method, params=params, merger=merger)
    return result


# -- merged intensities -------------------------------------------------------------------------
# MergedIntensities.extra entries with one value per group (variational.merge_variational's)
PER_GROUP_EXTRAS = ("bin_of", "wilson_sigma_per_group")


def _merged_on_output_rank(local_merged, french_wilson_amplitudes):
    """All ranks' merges (each rank's merging.api.merge_groups of its own groups, without
    French-Wilson amplitudes) in the one-process group order on rank 0, with French-Wilson
    amplitudes when asked (its prior is by resolution shell: global) or the merge's own
    (variational's posterior F); an empty MergedIntensities on the other ranks, which write
    no merged file.

    Gathered column by column in each column's own dtype and put in ASU order as it
    arrives: rank 0 alone holds every merged reflection here (a rotation run's merged and
    anomalous sets: its peak at N = 2 before, issue 11), so it holds the ordered columns
    and one gathered column at a time, not a float64 matrix of all columns, its sorted
    copy and the columns taken from it (~3x the merged data)."""
    from ..memory import release_free_memory
    from .french_wilson import french_wilson

    merged = local_merged
    # per-group extras (variational: Sigma and bin per group) named alike on every rank: a
    # rank's own count of groups can equal the length of a per-bin array by chance
    extra = [k for k in PER_GROUP_EXTRAS if isinstance(merged.extra.get(k), np.ndarray)]
    # the rest (variational: the per-bin Sigma, the EM iterations) is the same on every rank
    shared = {k: v for k, v in merged.extra.items() if k not in PER_GROUP_EXTRAS}
    # the merge's temporaries are gone: give their heap holes back before rank 0's gather
    release_free_memory(collect_cycles=False)
    output = mpi_world.is_output_rank()
    asu = mpi_world.gather_rows_to_output_rank(
        np.ascontiguousarray(merged.asu_index, dtype=np.int32).reshape(-1, 3))
    if not output:
        asu = asu[:0]
    order = np.lexsort((asu[:, 2], asu[:, 1], asu[:, 0]))
    asu = np.ascontiguousarray(asu[order])

    def gathered(values, dtype):
        values = mpi_world.gather_rows_to_output_rank(np.ascontiguousarray(values, dtype=dtype))
        return values[order] if output else values[:0]

    out = MergedIntensities(
        asu_index=asu,
        intensity=gathered(merged.intensity, np.float64),
        sigma=gathered(merged.sigma, np.float64),
        n_obs=gathered(merged.n_obs, np.int64), centric=gathered(merged.centric, bool),
        epsilon=gathered(merged.epsilon, np.float64),
        dstar_sq=gathered(merged.dstar_sq, np.float64),
        anomalous=merged.anomalous, method=merged.method,
        extra={name: gathered(merged.extra[name], merged.extra[name].dtype) for name in extra})
    out.extra.update(shared)
    if merged.amplitude is not None:  # the method's own amplitudes (variational posterior)
        out.amplitude = gathered(merged.amplitude, np.float64)
        out.amplitude_sigma = gathered(merged.amplitude_sigma, np.float64)
    if french_wilson_amplitudes and len(out):
        _, _, F, sigma_F = french_wilson(out.intensity, out.sigma, out.centric, out.dstar_sq)
        out.amplitude, out.amplitude_sigma = F, sigma_F
    return out


# -- observations for the unmerged MTZ ---------------------------------------------------------
def _empty_observations():
    return ScaledObservations(np.zeros((0, 3), np.int32), np.zeros(0), np.zeros(0),
                              batch=np.zeros(0, np.int64), scale=np.zeros(0),
                              scale_sigma=np.zeros(0), extra={})


def _local_observations(table, experiments, params, unit_cell):
    if table.nrows == 0:
        return _empty_observations()
    return scaled_observations(table, experiments, _param(params, "merging.d_min", None),
                               _param(params, "merging.d_max", None), unit_cell)


def _observations_on_output_rank(obs):
    """The observations of all ranks, in rank order, on rank 0 (ScaledObservations with the
    columns the unmerged MTZ reads); the other ranks get no observation."""
    comm = mpi_world.world()
    gather = mpi_world.gather_rows_to_output_rank
    columns = {
        "miller_index": np.asarray(obs.miller_index, dtype=np.int32).reshape(-1, 3),
        "intensity": obs.intensity, "sigma": obs.sigma,
        "batch": np.asarray(obs.batch, dtype=np.int64),
        "scale": np.asarray(obs.scale, dtype=np.float64),
        "scale_sigma": np.asarray(obs.scale_sigma, dtype=np.float64),
    }
    local_extra = obs.extra if len(obs) else {}
    names = sorted(local_extra) if comm is None else sorted(
        set().union(*comm.allgather(sorted(local_extra))))
    extra = {}
    for name in names:
        values = local_extra.get(name)
        extra[name] = gather(np.zeros(0) if values is None
                             else np.asarray(values, dtype=np.float64))
    out = {name: gather(values) for name, values in columns.items()}
    if not mpi_world.is_output_rank():
        return _empty_observations()
    return ScaledObservations(out["miller_index"], out["intensity"], out["sigma"],
                              batch=out["batch"], scale=out["scale"],
                              scale_sigma=out["scale_sigma"], extra=extra)


# -- report-only summaries from each rank's own observations ------------------------------------
class _GatheredGroups:
    """A grouping's per-group values gathered to rank 0 in the one-process group order (what
    diagnostics.anomalous_summary_of_halves reads: asu_index, centric, dstar_sq, derived),
    with `values`, per-group float64 columns gathered alongside, and `order`, the global
    position -> the rank-order position of the gathered groups. No group on the other ranks
    (they discard it)."""

    def __init__(self, local, *columns):
        from ..backends.rank_partition import packed_keys

        rows = np.empty((local.n_groups, 2 + len(columns)), dtype=np.float64)
        rows[:, 0] = local.centric
        rows[:, 1] = local.dstar_sq
        for j, values in enumerate(columns):
            rows[:, 2 + j] = values
        gather = mpi_world.gather_rows_to_output_rank
        asu = gather(np.ascontiguousarray(local.asu_index, dtype=np.int32))
        rows = gather(rows)
        if not mpi_world.is_output_rank():  # the others get their own rows back: not used
            asu, rows = asu[:0], rows[:0]
        # the one-process order: ASU indices in (h, k, l) order, i.e. of their packed keys
        self.order = np.argsort(packed_keys(asu), kind="stable")
        self.asu_index = np.ascontiguousarray(asu[self.order])
        self.centric = rows[self.order, 0] != 0
        self.dstar_sq = np.ascontiguousarray(rows[self.order, 1])
        self.values = [np.ascontiguousarray(rows[self.order, 2 + j])
                       for j in range(len(columns))]
        self.derived = {}


def _check_rank_order(local_groups):
    """The non-anomalous groups of rank r all precede those of rank r + 1 in the
    one-process order (rank_partition: each rank owns a range of non-anomalous ASU keys),
    so values taken group by group and concatenated (or continued) in rank order are in
    that order. Raises if the partition broke it."""
    from ..backends.rank_partition import packed_keys

    keys = packed_keys(local_groups.asu_index)
    ends = np.array([[keys.size, keys.min() if keys.size else 0,
                      keys.max() if keys.size else 0]], dtype=np.int64)
    ends = mpi_world.allgather_rows(ends)
    ends = ends[ends[:, 0] > 0]
    if np.any(ends[1:, 1] <= ends[:-1, 2]):
        raise VmergeError("internal error: the ranks' unique reflections are not in "
                          "consecutive ranges of the non-anomalous ASU order")


def _batch_sums(obs, groups, local_merged, space_group):
    """batch_statistics's per-batch sums over all ranks' observations (on rank 0), the
    batch numbers (sorted) and the data's d_min: each rank adds its groups' terms to the sums
    the ranks before it left (the non-anomalous groups are in rank order), so the sums have
    the one-process bits."""
    from .batch_statistics import N_SUMS, add_batch_sums_kernel, systematically_absent
    from .lookup import find_indices

    batch = np.asarray(obs.batch, dtype=np.int64)
    batches = np.unique(mpi_world.allgather_rows(np.unique(batch)))
    merged_intensity = local_merged.intensity
    if not np.array_equal(local_merged.asu_index, groups.asu_index):
        merged_intensity = merged_intensity[find_indices(groups.asu_index,
                                                         local_merged.asu_index)]
    in_complete_set = ~systematically_absent(groups.asu_index, space_group)
    batch_index = np.searchsorted(batches, batch).astype(np.int64)
    scale = np.asarray(obs.scale, dtype=np.float64)

    def add(sums):
        add_batch_sums_kernel(sums, groups.permutation, groups.group_start, obs.intensity,
                              obs.sigma, scale, batch_index,
                              np.asarray(merged_intensity, dtype=np.float64), in_complete_set)

    sums = mpi_world.pass_along_ranks(np.zeros((len(batches), N_SUMS)), add)
    largest = groups.dstar_sq.max() if groups.n_groups else 0.0
    largest = float(mpi_world.allgather_rows(np.array([largest])).max())
    d_min = 1.0 / np.sqrt(largest) if largest > 0 else 0.0
    return sums, batches, d_min


def _scale_histogram(scale):
    """diagnostics.scale_histogram of all ranks' scales: each rank bins its own over the
    range of all of them and the counts (integers) are added."""
    from .diagnostics import _scale_range, scale_histogram

    scale = np.asarray(scale, dtype=np.float64)
    ends = np.array([[scale.min(), scale.max()] if scale.size else [np.inf, -np.inf]])
    ends = mpi_world.allgather_rows(ends)
    value_range = _scale_range(np.array([ends[:, 0].min(), ends[:, 1].max()]))
    histogram = scale_histogram(scale, value_range)
    counts = np.array(histogram["counts"] + [histogram["below"], histogram["above"]],
                      dtype=np.float64)
    counts = np.asarray(mpi_world.sum_over_ranks(counts)).astype(np.int64)
    histogram["counts"] = counts[:-2].tolist()
    histogram["below"], histogram["above"] = int(counts[-2]), int(counts[-1])
    return histogram


class _LocalReportParts:
    """What each rank computes from its own observations for the report-only summaries of
    merging.api.merge_observations (sigma calibration, statistics against batch, merge
    diagnostics): the per-batch sums continued rank after rank (on rank 0), histogram counts
    added, and per observation only the deviations that the summaries sort or average
    (8-24 B) and per group a few values, gathered to rank 0 by `summarise`: never the
    observations. Every rank builds it (collectives); the observations and their groupings
    can go once it is built."""

    def __init__(self, obs, groupings, local_merged, space_group):
        from .calibration import grouped_deviations
        from .diagnostics import alternate_half_means_kernel, normalised_deviations

        groups = groupings.get(False)
        anom = groupings.get(True)
        _check_rank_order(groups)
        self.sums, self.batches, self.d_min = _batch_sums(obs, groups, local_merged,
                                                          space_group)
        self.scales = _scale_histogram(obs.scale)
        self.deviations = normalised_deviations(groups, obs.intensity, obs.sigma)
        # calibration: deviations of the anomalous groups, whose one-process order
        # interleaves the ranks' groups (an I(-) key lies outside its rank's key range)
        delta, others_mean, group = grouped_deviations(obs.intensity, obs.sigma, anom)
        kept = np.bincount(group, minlength=anom.n_groups).astype(np.float64)
        del group
        # filled column by column, each input dropped once copied (the peak of ranks
        # other than 0 is here: column_stack held both inputs, `group` and the result)
        self.calibration = np.empty((delta.size, 2))
        self.calibration[:, 0] = delta
        del delta
        self.calibration[:, 1] = others_mean
        del others_mean
        halves = () if space_group.is_centric() else alternate_half_means_kernel(
            anom.permutation, anom.group_start, obs.intensity, obs.sigma)
        self.anomalous_groups = anom
        self.group_columns = (kept, *halves)

    def summarise(self, result, params, log):
        """Gather the calibration's parts to rank 0 and set result.calibration and
        .per_batch there, as merging.api.merge_observations (a failure of the statistics
        against batch is reported and leaves them out). Every rank calls it, before the
        merged reflections are gathered (so that rank 0 holds the deviations and the merged
        reflections one after the other)."""
        from .api import with_excluded_batches
        from .batch_statistics import batch_tables
        from .calibration import calibration_summary, order_of_group_runs

        self.groups = _GatheredGroups(self.anomalous_groups, *self.group_columns)
        calibration = mpi_world.gather_rows_to_output_rank(self.calibration)
        self.calibration = self.anomalous_groups = self.group_columns = None
        if not mpi_world.is_output_rank():
            return
        groups = self.groups
        kept = groups.values[0].astype(np.int64)
        # the gathered deviations lie group after group in rank order: taken in the
        # groups' one-process order they are the one-process array
        kept_in_rank_order = np.empty_like(kept)
        kept_in_rank_order[groups.order] = kept
        one_process_order = order_of_group_runs(groups.order, kept_in_rank_order)
        del kept_in_rank_order
        # the two columns taken straight into the one-process order and the gathered rows
        # dropped before the summary (it sorts, so it is rank 0's peak after the statistics)
        delta = calibration[one_process_order, 0]
        others_mean = calibration[one_process_order, 1]
        del calibration, one_process_order
        group = np.repeat(np.arange(len(kept), dtype=np.int64), kept)
        result.calibration = calibration_summary(delta, others_mean, group, groups.dstar_sq)
        del delta, others_mean, group
        try:
            result.per_batch = with_excluded_batches(
                batch_tables(self.sums, self.batches, self.d_min, result.experiments,
                             result.space_group, result.unit_cell, result.method), params)
        except Exception as e:
            log.warning(f"Statistics against batch could not be computed: {e}")

    def diagnose(self, result, table, log, rank_local=False):
        """Set result.diagnostics on rank 0 (merging.api.merge_observations's merge
        diagnostics; reads result.merged). Every rank calls it, after `summarise`.
        rank_local: `table` holds only this rank's rows (a rank-local job), so the outlier
        summary is made from every rank's outliers (_outlier_summary_over_ranks)."""
        from .diagnostics import deviation_summary, diagnostics_of

        outliers = None
        if rank_local:
            outliers = _outlier_summary_over_ranks(table, result.experiments)
        deviations = mpi_world.gather_rows_to_output_rank(self.deviations)
        self.deviations = None
        if not mpi_world.is_output_rank():
            return
        groups = self.groups
        try:
            halves = groups.values[1:] if len(groups.values) > 1 else None
            result.diagnostics = diagnostics_of(result, deviation_summary(deviations),
                                                self.scales, groups, halves, table,
                                                result.experiments, outliers=outliers)
        except Exception as e:
            log.warning(f"Merge diagnostics for the report could not be computed: {e}")


def _outlier_summary_over_ranks(table, experiments):
    """diagnostics.outlier_summary of the whole scaled table (all ranks' rows in file order)
    on rank 0, from each rank's own outlier rows of a rank-local table: their output order
    keys, batches and detector x, y gathered (outliers only: ~1% of the rows); None on the
    other ranks. Every rank calls it (collectives)."""
    from .. import flags
    from .api import _batches
    from .diagnostics import MAX_OUTLIER_POINTS

    if "flags" not in table or "xyzobs.px.value" not in table:  # same columns on every rank
        return {"n": 0}
    rows = np.flatnonzero((table.peek("flags") & np.uint64(flags.outlier_in_scaling)) != 0)
    keys = np.asarray(table.output_order_key, dtype=np.int64)[rows]
    xyz = table.peek("xyzobs.px.value", rows) if rows.size else np.zeros((0, 3))
    batch = (np.asarray(_batches(table, rows, experiments), dtype=np.int64) if rows.size
             else np.zeros(0, np.int64))
    gather = mpi_world.gather_rows_to_output_rank
    ints = gather(np.ascontiguousarray(np.column_stack([keys, batch]), dtype=np.int64))
    xy = gather(np.ascontiguousarray(xyz[:, :2], dtype=np.float64))
    if not mpi_world.is_output_rank():
        return None
    order = np.argsort(ints[:, 0], kind="stable")  # file order, as the one-process rows
    out = {"n": int(order.size)}
    if order.size == 0:
        return out
    step = max(1, math.ceil(order.size / MAX_OUTLIER_POINTS))
    shown = order[::step]
    out["every"] = step
    out["x_px"] = np.round(xy[shown, 0], 1).tolist()
    out["y_px"] = np.round(xy[shown, 1], 1).tolist()
    batches, counts = np.unique(ints[:, 1], return_counts=True)
    out["batch"] = batches.astype(np.int64).tolist()
    out["count"] = counts.astype(np.int64).tolist()
    return out


# -- the merge ---------------------------------------------------------------------------------
def merge_rank_rows(table, experiments, params, log=None, half_dataset=False) -> MergeResult:
    """merging.api.merge_scaled_table (RANK_METHODS) with each rank holding its own rows of
    `table` (the whole input, columns still in the file): the same MergeResult on rank 0
    (the statistics and the half-dataset cross-validation on every rank; the merged
    intensities and the report-only summaries on rank 0 alone: the other ranks' results hold
    no merged reflection and write nothing that is published)."""
    from .. import geometry
    from ..backends.rank_local import holds_own_rows
    from ..backends.rank_partition import rank_rows
    from .api import mean_of_friedel_amplitudes

    log = log or logging.getLogger(__name__)
    if not len(experiments):
        raise VmergeError("no experiments to merge")
    space_group = geometry.space_group(experiments[0])
    unit_cell = geometry.median_unit_cell(experiments)
    wavelength = geometry.wavelength(experiments[0]) if experiments[0].beam else 1.0
    rank_local = holds_own_rows(table)
    # a rank-local job's scaled table already is this rank's rows (whole non-anomalous ASU
    # groups of a key range, in the one-process order): taken as they are
    own_table = table if rank_local else rank_rows(table, space_group, mpi_world.n_ranks(),
                                                   mpi_world.rank()).table
    rows_per_rank = mpi_world.allgather_rows(np.array([own_table.nrows], dtype=np.int64))
    log.info(f"MPI: merging each rank's own unique reflections (rows per rank "
             f"{' / '.join(str(int(n)) for n in rows_per_rank)} of "
             f"{int(rows_per_rank.sum()) if rank_local else table.nrows})")
    error, obs, none_left = None, None, None
    try:
        obs = _local_observations(own_table, experiments, params, unit_cell)
    except VmergeError as e:
        # "no reflections ..." (scaled_observations: every row flagged, below the
        # partiality cut or outside d_min/d_max) is an error of the whole data only, not of
        # one rank's share of it
        if str(e).startswith("no reflections"):
            obs, none_left = _empty_observations(), e
        else:
            error = e
    _raise_together(error)
    n_total = int(round(mpi_world.sum_over_ranks(float(len(obs)))))
    if n_total == 0:
        _raise_together(none_left or VmergeError("no reflections left to merge"))
    method = single_method(params)
    fw = bool(_param(params, "merging.french_wilson", True))
    n_bins = int(_param(params, "merging.nbins", 20))
    groupings = Groupings(obs.miller_index, space_group, unit_cell)
    merger = None
    if method == "variational":
        # as merging.api.merge_observations: the merges first (Sigma(d) fitted over every
        # rank's groups), then the statistics of them (MethodMerger: subsets merged with
        # the full data's Sigma held fixed)
        from .rank_variational import RankMethodMerger, merge_variational_rank_rows

        local_merged = merge_variational_rank_rows(groupings.get(False), obs.intensity,
                                                   obs.sigma, params)
        local_merged_anom = merge_variational_rank_rows(groupings.get(True), obs.intensity,
                                                        obs.sigma, params)
        merger = RankMethodMerger(method, params, [local_merged, local_merged_anom])
    try:
        statistics = rank_merging_statistics(
            obs.miller_index, obs.intensity, obs.sigma, space_group, unit_cell, n_bins=n_bins,
            with_anomalous_table=not space_group.is_centric(), groupings=groupings,
            method=method, params=params, merger=merger)
    except Exception as e:  # every rank meets the same (gathered) values: all fail alike
        log.warning(f"Merging statistics could not be computed: {e}")
        statistics = None
    del merger
    half = _rank_half_dataset(obs, groupings, space_group, unit_cell, method, params) \
        if half_dataset else None
    if method != "variational":
        local_merged = merge_groups(method, groupings.get(False), obs.intensity, obs.sigma,
                                    params, french_wilson_amplitudes=False)
        local_merged_anom = merge_groups(method, groupings.get(True), obs.intensity,
                                         obs.sigma, params, french_wilson_amplitudes=False)
    # French-Wilson is not applied to variational merges (their amplitudes are the
    # posterior's), as in merging.api.merge_observations
    fw = fw and method != "variational"
    unmerged = bool(_param(params, "merging.output.unmerged_mtz", None))
    # the observations of all ranks on rank 0 only for the unmerged MTZ, which lists them
    gathered = _observations_on_output_rank(obs) if unmerged else _empty_observations()
    result = MergeResult(method, space_group, unit_cell, wavelength, gathered, None, None,
                         statistics, half_dataset=half, experiments=experiments,
                         observation_count=n_total)
    parts = _LocalReportParts(obs, groupings, local_merged, space_group)
    # rank 0 then holds, one after the other, the calibration's deviations and the merged
    # reflections; no rank keeps its observations
    del own_table, obs, groupings
    parts.summarise(result, params, log)
    merged = _merged_on_output_rank(local_merged, fw)
    del local_merged
    merged_anom = _merged_on_output_rank(local_merged_anom, fw)
    del local_merged_anom
    if fw and len(merged):
        merged.amplitude, merged.amplitude_sigma = mean_of_friedel_amplitudes(merged,
                                                                              merged_anom)
    result.merged, result.merged_anomalous = merged, merged_anom
    parts.diagnose(result, table, log, rank_local=rank_local)
    return result


def _rank_half_dataset(obs, groupings, space_group, unit_cell, method, params) -> dict:
    """merging.api.half_dataset_for on the ranks' own observations (every rank gets it;
    variational: the full data's Sigma fitted over all ranks, rank_half_dataset_statistics
    takes the rank version of the merger)."""
    from .api import HalfDatasetMerger
    from .rank_halfdataset import rank_half_dataset_statistics

    return rank_half_dataset_statistics(
        obs.miller_index, obs.intensity, obs.sigma, obs.batch, space_group, unit_cell,
        HalfDatasetMerger(method, params),
        repeats=int(_param(params, "merging.half_dataset_repeats", 10)),
        seed=int(_param(params, "merging.seed", 0)),
        n_bins=int(_param(params, "merging.nbins", 20)),
        groupings=groupings,
    )
