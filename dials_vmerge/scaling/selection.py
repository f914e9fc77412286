"""Choosing the reflections the model is minimised on (dials-scaling.md 8).

All functions work on the global IhTable of suitable reflections and return a boolean mask
over its observations. Random choices use numpy's default_rng with a fixed seed (42, the
seed DIALS gives its generator), so a run is reproducible; the picks differ from DIALS's
scitbx generator, so only the statistics of the subset match DIALS, not its members.

Issue 11 (rank-local jobs, backends/rank_local.py): the table may hold only this MPI rank's
groups (a contiguous run of the one-process groups, or, grouped by the anomalous index,
groups interleaved with other ranks'). Per-row and per-group quantities are computed from the
rank's own rows (a group is whole on one rank); the group-level choices (candidate lists,
mean multiplicities, random draws, the quasi-random loops) run on per-group arrays gathered
in the one-process group order (backends/group_order.py), identically on every rank, and
each rank keeps its own part. So every rank's mask is the one-process mask restricted to
its observations, bit for bit; in one process the primitives are identities and the masks
are those of the code before issue 11.

quasi_random for several datasets is simplified: (1) groups spanning the most datasets are
taken first, least-covered dataset first, until each dataset has its share of the
connected target; (2) random groups within each dataset; (3) random groups overall up to
the total target. DIALS's 20 resolution bins and top-up logic are not reproduced.
"""

from __future__ import annotations

import math

import numpy as np

from ..backends import rank_local
from ..backends.group_order import GroupOrder

SEED = 42


def _isigma(table):
    with np.errstate(divide="ignore", invalid="ignore"):
        return table.intensity / np.sqrt(table.variance)


def preselection(table, isigma_range=(2.0, 0.0), min_partiality=None, d_range=None, d=None,
                 partiality=None):
    """I/sigma above Isigma_range[0] (and below [1] if > 0), partiality and d range."""
    isig = _isigma(table)
    keep = isig > isigma_range[0]
    if isigma_range[1] and isigma_range[1] > 0:
        keep &= isig < isigma_range[1]
    if partiality is not None and min_partiality is not None:
        keep &= partiality > min_partiality
    if d_range is not None and d is not None:
        keep &= (d > d_range[0]) & (d < d_range[1])
    return keep


def _group_counts(table, mask):
    grp = table.group_of_observation()
    return np.bincount(grp[mask], minlength=table.n_groups), grp


def _n_groups_to_choose(mean_multiplicity, min_groups, min_reflections):
    return max(int(math.ceil(min_reflections / mean_multiplicity)), int(min_groups))


def _random_groups(candidates, n_choose, n_groups, seed):
    """Mask over the groups: n_choose of the candidate groups drawn without replacement
    (all of them when there are no more than n_choose)."""
    if n_choose < candidates.size:
        candidates = np.random.default_rng(seed).choice(candidates, n_choose, replace=False)
    chosen = np.zeros(n_groups, dtype=bool)
    chosen[candidates] = True
    return chosen


def _group_order(table, groups):
    """Where the table's groups lie among all ranks' groups (GroupOrder), built once per
    selection by the caller or here."""
    return GroupOrder(table.asu_index) if groups is None else groups


def _observation_mask(table, groups, chosen_all_groups, grp=None):
    """The mask over this table's observations of groups chosen among all groups."""
    own = groups.own(chosen_all_groups)
    return own[table.group_of_observation() if grp is None else grp]


def _use_all(table):
    return np.ones(table.n_obs, dtype=bool)


def select_single_dataset(table, preselected, min_groups=2000, min_reflections=50000,
                          seed=SEED, groups=None):
    """8.1: random groups whose preselected multiplicity > 1; falls back to use_all."""
    groups = _group_order(table, groups)
    counts, grp = _group_counts(table, preselected)
    counts = groups.gather(counts)
    candidates = np.flatnonzero(counts > 1)
    if candidates.size == 0:
        return _use_all(table)
    n_choose = _n_groups_to_choose(counts[candidates].mean(), min_groups, min_reflections)
    chosen = _random_groups(candidates, n_choose, counts.size, seed)
    return _observation_mask(table, groups, chosen, grp) & preselected


def _group_mean_isigma(table):
    grp = table.group_of_observation()
    total = np.bincount(grp, np.nan_to_num(_isigma(table)), minlength=table.n_groups)
    return total / np.maximum(table.multiplicity(), 1)


def select_random(table, min_groups=2000, min_reflections=50000, isigma_cutoff=1.0, seed=SEED,
                  groups=None):
    """Groups with mean I/sigma > cutoff and n > 1, max(min_groups, ceil(min_refl/<m>))."""
    groups = _group_order(table, groups)
    mult = groups.gather(table.multiplicity())
    bright = groups.gather(_group_mean_isigma(table) > isigma_cutoff)
    candidates = np.flatnonzero(bright & (mult > 1))
    if candidates.size == 0:
        candidates = np.flatnonzero(mult > 1)
    if candidates.size == 0:
        return _use_all(table)
    n_choose = _n_groups_to_choose(mult[candidates].mean(), min_groups, min_reflections)
    chosen = _random_groups(candidates, n_choose, mult.size, seed)
    return _observation_mask(table, groups, chosen)


class _Pairs:
    """This rank's (group, dataset) pairs with their observation counts, sparse and
    group-major, the groups numbered by their one-process positions (GroupOrder): a dense
    datasets x groups count matrix costs 8 B x datasets x groups (and a scan of every group
    once per dataset).

    The quasi-random steps read other ranks' pairs only through `gather`, which gives every
    rank the pairs of some groups in the one-process order (group, then dataset); never all
    pairs at once: with many stills there are about as many pairs as observations."""

    def __init__(self, table, grp, n_datasets, groups):
        self.groups = groups
        key, self.count = np.unique(
            grp.astype(np.int64) * n_datasets + np.asarray(table.dataset_id, dtype=np.int64),
            return_counts=True)
        self.local_group = key // n_datasets
        self.dataset = key - self.local_group * n_datasets
        del key
        # ascending where the local groups' positions are (not for the anomalous layout's
        # (unique reflection, hand) order: gather then sorts the pairs)
        self.group = groups.positions(self.local_group)
        self.n_local = table.n_groups

    def span(self):
        """The number of datasets in each of this rank's groups."""
        return np.bincount(self.local_group, minlength=self.n_local)

    def gather(self, keep):
        """(group, dataset, count) of the pairs where keep (a mask over them), of all ranks,
        in (group, dataset) order as np.unique over all observations gives them."""
        group, dataset, count = (
            rank_local.gather_in_rank_order(np.ascontiguousarray(a[keep]))
            for a in (self.group, self.dataset, self.count))
        if not self.groups.in_rank_order:  # each rank's pairs ascend: merge them
            by_pair = np.lexsort((dataset, group))
            group, dataset, count = group[by_pair], dataset[by_pair], count[by_pair]
        return group, dataset, count


class _MembersInOrder:
    """The datasets and counts of the groups visited in `order`, gathered in batches (a
    doubling number of groups, the same requests on every rank): the first quasi-random
    step usually stops long before the end of `order`."""

    FIRST_BATCH = 4096

    def __init__(self, pairs, order):
        self.pairs, self.order = pairs, order
        self.fetched = 0
        self.batch = self.FIRST_BATCH

    def _fetch(self):
        positions = self.order[self.fetched:self.fetched + self.batch]
        self.fetched += positions.size
        self.batch *= 2
        owned, local = self.pairs.groups.local_of(positions)
        wanted = np.zeros(self.pairs.n_local, dtype=bool)
        wanted[local[owned]] = True
        self.group, self.dataset, self.count = self.pairs.gather(
            wanted[self.pairs.local_group])

    def __call__(self, position):
        """(datasets, counts) of group order[position]; positions are asked in increasing
        order."""
        if position >= self.fetched:
            self._fetch()
        grp_id = self.order[position]
        lo, hi = np.searchsorted(self.group, [grp_id, grp_id + 1])
        return self.dataset[lo:hi], self.count[lo:hi]


def select_quasi_random_multi(table, n_datasets, preselected, min_groups=2000,
                              min_reflections=50000, isigma_cutoff=1.0, seed=SEED,
                              groups=None):
    """Simplified 8.2 (see module docstring)."""
    placed = _group_order(table, groups)  # (`groups` is reused below for group ids)
    rng = np.random.default_rng(seed)
    grp = table.group_of_observation()
    mult = placed.gather(table.multiplicity())
    mean_isigma = placed.gather(_group_mean_isigma(table))
    eligible = (mean_isigma > isigma_cutoff) & (mult > 1)
    if not eligible.any():
        eligible = (mean_isigma > 0) & (mult > 1)
    del mean_isigma
    if not eligible.any():
        return _use_all(table)
    mean_mult = mult[mult > 1].mean()
    total_target = max(mean_mult * min_groups, min_reflections)
    target_qr = min(1000, min_groups) * mean_mult
    n_groups = mult.size
    pairs = _Pairs(table, grp, n_datasets, placed)
    span = placed.gather(pairs.span())  # datasets per group
    chosen = np.zeros(n_groups, dtype=bool)
    per_dataset = np.zeros(n_datasets, dtype=np.int64)
    share = target_qr / (n_datasets * 4.0)
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-span[order], kind="stable")]
    del span
    members_of = _MembersInOrder(pairs, order)
    used = 0
    for position, grp_id in enumerate(order):  # loop over candidate groups, not reflections
        if used > 1.2 * target_qr or (per_dataset >= share).all():
            break
        neediest = int(np.argmin(per_dataset))
        members, counts = members_of(position)
        if per_dataset[neediest] < share and not (members == neediest).any():
            continue
        chosen[grp_id] = True
        per_dataset[members] += counts
        used += mult[grp_id]
    del members_of
    # within each dataset: random eligible groups until its share is reached. Only pairs
    # of more than one observation in a group not chosen above can be taken: those alone
    # are gathered (with stills, few)
    open_own = placed.own(eligible & ~chosen)
    pair_group, pair_dataset, pair_count = pairs.gather(
        (pairs.count > 1) & open_own[pairs.local_group])
    del pairs, open_own
    per_dataset_target = (total_target - used) / (2.0 * n_datasets)
    by_dataset = np.argsort(pair_dataset, kind="stable")  # groups ascending within each
    dataset_pairs = np.searchsorted(pair_dataset[by_dataset], np.arange(n_datasets + 1))
    for d in range(n_datasets):
        mine = by_dataset[dataset_pairs[d]:dataset_pairs[d + 1]]
        groups, counts = pair_group[mine], pair_count[mine]
        usable = ~chosen[groups]  # (more than one observation, eligible: gathered so)
        groups, counts = groups[usable], counts[usable]
        # the permutation a shuffle of the groups themselves would make (it depends on the
        # length alone), applied to groups and counts together
        permutation = np.arange(groups.size)
        rng.shuffle(permutation)
        groups, counts = groups[permutation], counts[permutation]
        cumulative = np.cumsum(counts)
        take = groups[: int(np.searchsorted(cumulative, per_dataset_target)) + 1]
        chosen[take] = True
        used += int(mult[take].sum())
    # across datasets: random groups to reach the total target
    rest = np.flatnonzero(eligible & ~chosen)
    if used < total_target and rest.size:
        rng.shuffle(rest)
        cumulative = np.cumsum(mult[rest])
        take = rest[: int(np.searchsorted(cumulative, total_target - used)) + 1]
        chosen[take] = True
    return _observation_mask(table, placed, chosen, grp) & preselected


def select_intensity_ranges(table, e_squared=None, e2_range=(0.8, 5.0), isigma_range=(2.0, 0.0),
                            partiality=None, min_partiality=None, d=None, d_range=None):
    """8.3: E^2 window (when E^2 was computed), I/sigma > 2, partiality and d range."""
    keep = preselection(table, isigma_range, min_partiality, d_range, d, partiality)
    if e_squared is not None:
        keep &= (e_squared > e2_range[0]) & (e_squared < e2_range[1])
    return keep


def _e_squared(table, space_group, unit_cell):
    """outliers.e_squared without its size rule (the caller decides on all ranks' rows)."""
    from .normalisation import grouped_quasi_normalised_e_squared

    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = table.intensity / table.g
    scaled[table.g == 0] = 0.0
    return grouped_quasi_normalised_e_squared(table.asu_index, table.group_start, scaled,
                                              space_group, unit_cell)


def e2_window_by_dataset(table, keep, n_datasets, space_group, unit_cell,
                         e2_range=(0.8, 5.0), min_rows=None):
    """keep &= the E^2 window, in place, for each dataset with more than min_rows rows
    (default: the size DIALS normalises at; stills are below it); E^2 is normalised per
    dataset. Datasets are chosen by their rows on all ranks: every rank takes part in the
    E^2 of such a dataset (its shell sums span the ranks) even with no rows of it."""
    from ..kernels.flat import split_positions
    from .outliers import MIN_REFLECTIONS_FOR_NORMALISATION

    min_rows = MIN_REFLECTIONS_FOR_NORMALISATION if min_rows is None else min_rows
    positions_of = split_positions(table.dataset_id, n_datasets)
    sizes = rank_local.totals([p.size for p in positions_of])
    group_of_obs = None
    for d in np.flatnonzero(sizes > min_rows):
        positions = positions_of[d]
        if group_of_obs is None:
            group_of_obs = table.group_of_observation()
        esq = _e_squared(table.select(positions, group_of_obs=group_of_obs), space_group,
                         unit_cell)
        keep[positions] &= (esq > e2_range[0]) & (esq < e2_range[1])
    return keep


# method=auto uses every suitable reflection below these counts (issue 10's rule): a subset
# saves nothing there, and a dataset whose rows all fail the subset's I/sigma preselection
# would be left with nothing to minimise on.
AUTO_USE_ALL_BELOW_ONE_DATASET = 20_000
AUTO_USE_ALL_BELOW_SEVERAL_DATASETS = 40_000


def resolve_method(method, is_stills, n_suitable=None, n_datasets=1):
    """The selection method `auto` stands for: use_all when there are fewer than 20 000
    suitable reflections for one dataset (40 000 over several), otherwise intensity_ranges
    for stills and quasi_random for rotation data (dials.scale's resolution). Without
    n_suitable, the size rule is not applied."""
    if method not in (None, "auto"):
        return method
    if n_suitable is not None:
        limit = (AUTO_USE_ALL_BELOW_ONE_DATASET if n_datasets <= 1
                 else AUTO_USE_ALL_BELOW_SEVERAL_DATASETS)
        if n_suitable < limit:
            return "use_all"
    return "intensity_ranges" if is_stills else "quasi_random"
