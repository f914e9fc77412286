"""filtering.method=deltacchalf: dials.scale's scale-and-filter cycles.

Each cycle scales, computes the ΔCC½ of every dataset (mode=dataset) or image group
(mode=image_group) in one pass (delta_cc_half.py), removes those below
mean − stdcutoff × sd, and scales again, until nothing is removed, max_cycles is reached,
more than max_percent_removed of the reflections are gone or the completeness falls below
min_completeness (then one more scaling of what is left). As dials.scale:

* the ΔCC½ input is the scaled I/g of the rows not bad for scaling, with g > 0, V > 0 and
  partiality >= cut_data.partiality_cutoff, partials not combined, indices mapped to the
  non-anomalous ASU, d and 10 resolution bins (equal steps in 1/d²) from the mean cell;
* removed datasets are absent from the output; a removed image group is excluded through
  its dataset's valid image ranges, and only groups at either end of a sweep are removed
  (repeatedly, so a run of bad groups at an end goes); a dataset left with no valid images
  is removed;
* scale_and_filter_results.json has AnalysisResults.to_dict()'s layout.

* the cycles scale without the full-matrix round; when the run wants one (full_matrix, or
  auto: rotation data, at most 10 datasets), the data left are scaled once more with it at
  the end, as are they whenever the last cycle removed something.

Under MPI (issue 11) the cycles are pipeline.ScalingCycles: each rank keeps its own rows (its
key range of the first cycle's partition) from cycle to cycle, and everything here is
reduced over ranks so that every rank takes one process's decisions with its bits: counts
(rank_local.total), the bins' range (min/max), the groups (ids gathered, image ranges by
min/max), the ΔCC½ sums (passes continued rank to rank: delta_cc_half.py) and the cycle's
merging statistics (merging/rank_merge.py). Outside a rank-local job these are identities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import flags
from ..backends import rank_local
from ..errors import VmergeError
from .delta_cc_half import cc_half_without_each_group

N_RESOLUTION_BINS = 10  # dials.compute_delta_cchalf's nbins


# -- the ΔCC½ input -------------------------------------------------------------------------
@dataclass
class DeltaCCHalfInput:
    x: np.ndarray  # scaled I/g of the rows used
    dataset: np.ndarray  # their id values
    image: np.ndarray  # their image numbers, floor(z_obs) + 1
    unique: np.ndarray  # unique-reflection index (non-anomalous ASU) of each row
    bin_of_unique: np.ndarray  # resolution bin of each unique reflection
    n_scaled_rows: int  # rows flagged scaled in the table (for the removal counts)


def mean_unit_cell(experiments):
    """The mean of each cell parameter (dials.compute_delta_cchalf uses the mean, not the
    median cell of scaling and merging)."""
    from cctbx import uctbx

    from ..geometry import unit_cell

    return uctbx.unit_cell(tuple(np.mean([unit_cell(e).parameters() for e in experiments],
                                         axis=0)))


def delta_cc_half_input(table, experiments, partiality_cutoff=None,
                        n_bins=N_RESOLUTION_BINS) -> DeltaCCHalfInput:
    from ..geometry import space_group
    from ..merging.groups import per_index_chunks
    from .ih_table import map_indices_to_asu

    g = table.peek("inverse_scale_factor")
    variance = table.peek("intensity.scale.variance")
    keep = (g > 0) & (variance > 0)
    del variance
    keep &= (table.peek("flags") & np.uint64(flags.bad_for_scaling)) == 0
    if partiality_cutoff is not None and "partiality" in table:
        keep &= table.peek("partiality") >= partiality_cutoff
    rows = np.flatnonzero(keep)
    del keep
    if rank_local.total(rows.size) == 0:
        raise VmergeError("ΔCC½ filtering: no scaled reflections to analyse")
    x = table.peek("intensity.scale.value", rows) / g[rows]
    del g
    dataset = table.peek("id", rows).astype(np.int64)
    image = np.floor(table.peek("xyzobs.px.value", rows)[:, 2]).astype(np.int64) + 1
    asu = map_indices_to_asu(table.peek("miller_index", rows), space_group(experiments[0]),
                             False).astype(np.int64)
    # one integer key per index: |h|, |k|, |l| < 2^20 for any real cell
    key = ((asu[:, 0] + (1 << 20)) << 42) | ((asu[:, 1] + (1 << 20)) << 21) | (asu[:, 2] + (1 << 20))
    keys, first, unique = np.unique(key, return_index=True, return_inverse=True)
    del key, keys
    cell = mean_unit_cell(experiments)
    d = per_index_chunks(asu[first], cell.d)
    d_star_sq = 1.0 / d ** 2
    # the bins span every rank's reflections (a rank may have none)
    low = rank_local.minimum(d_star_sq.min() if d_star_sq.size else np.inf)
    high = rank_local.maximum(d_star_sq.max() if d_star_sq.size else -np.inf)
    if not high > low:
        raise VmergeError("ΔCC½ filtering: the scaled reflections span no resolution range")
    width = (high - low) / n_bins
    bin_of_unique = np.clip(np.floor((d_star_sq - low) / width).astype(np.int64), 0,
                            n_bins - 1)
    n_scaled = rank_local.total(table.get_flags(flags.scaled).sum()) if "flags" in table else 0
    return DeltaCCHalfInput(x, dataset, image, unique.ravel().astype(np.int64), bin_of_unique,
                            n_scaled)


# -- groups -----------------------------------------------------------------------------------
@dataclass
class Groups:
    of_row: np.ndarray  # group of each input row
    dataset: np.ndarray  # id value of each group's dataset
    image_range: Optional[np.ndarray]  # (n_groups, 2) first, last image; None in dataset mode

    @property
    def n(self) -> int:
        return len(self.dataset)


def _dataset_ids(data: DeltaCCHalfInput):
    """(the id values with rows on any rank, ascending; each row's position among them)."""
    ids = np.unique(rank_local.gather_in_rank_order(np.unique(data.dataset)))
    return ids, np.searchsorted(ids, data.dataset).astype(np.int64)


def dataset_groups(data: DeltaCCHalfInput) -> Groups:
    ids, of_row = _dataset_ids(data)
    return Groups(of_row, ids, None)


def image_groups(data: DeltaCCHalfInput, group_size: int) -> Groups:
    """Groups of group_size images from each dataset's first image with data; a last group
    shorter than group_size − 1 images joins the one before (dials.compute_delta_cchalf)."""
    ids, position = _dataset_ids(data)
    n = len(ids)
    # each dataset's first and last image over every rank's rows (exact in float64)
    first = np.full(n, np.inf)
    last = np.full(n, -np.inf)
    np.minimum.at(first, position, data.image.astype(np.float64))
    np.maximum.at(last, position, data.image.astype(np.float64))
    first = np.atleast_1d(rank_local.minimum(first)).astype(np.int64)
    last = np.atleast_1d(rank_local.maximum(last)).astype(np.int64)
    n_starts = (last - first) // group_size + 1
    last_start = first + (n_starts - 1) * group_size
    short = (n_starts > 1) & (last - last_start < group_size - 1)
    n_starts = n_starts - short
    offset = np.r_[0, np.cumsum(n_starts)]
    within = np.minimum((data.image - first[position]) // group_size, n_starts[position] - 1)
    of_row = offset[position] + within
    n_groups = int(offset[-1])
    dataset_position = np.repeat(np.arange(n), n_starts)
    index_in_dataset = np.arange(n_groups) - offset[dataset_position]
    start = first[dataset_position] + index_in_dataset * group_size
    end = np.where(index_in_dataset == n_starts[dataset_position] - 1, last[dataset_position],
                   start + group_size - 1)
    return Groups(of_row, ids[dataset_position], np.stack([start, end], axis=1))


# -- analysis ---------------------------------------------------------------------------------
@dataclass
class DeltaCCHalfResult:
    groups: Groups
    mean_cc_half: float
    cc_half_without: np.ndarray
    delta_cc_half: np.ndarray  # mean_cc_half − cc_half_without, per group
    cutoff: float
    below: np.ndarray  # group indices with ΔCC½ < cutoff, by ΔCC½ ascending

    def sorted_values(self) -> Tuple[List[int], List[float]]:
        """(group labels, ΔCC½) from low to high ΔCC½ (DIALS's per_dataset lists; a group's
        label is its index in image_group mode, its id value in dataset mode)."""
        order = np.argsort(self.delta_cc_half, kind="stable")
        labels = (self.groups.dataset if self.groups.image_range is None
                  else np.arange(self.groups.n))
        return [int(labels[i]) for i in order], [float(self.delta_cc_half[i]) for i in order]


def delta_cc_half_analysis(data: DeltaCCHalfInput, groups: Groups, stdcutoff: float,
                           n_bins=N_RESOLUTION_BINS) -> DeltaCCHalfResult:
    if groups.n < 2:
        raise VmergeError(
            "filtering.method=deltacchalf: "
            + ("one dataset cannot be filtered in mode=dataset; use "
               "filtering.deltacchalf.mode=image_group" if groups.image_range is None else
               "only one image group; choose a smaller filtering.deltacchalf.group_size"))
    # a rank's unique reflections are a contiguous run of the one-process order: the
    # passes over them continue from rank to rank (one process's bits)
    cc_all, cc_without = cc_half_without_each_group(
        data.x, data.unique, groups.of_row, data.bin_of_unique, groups.n, n_bins,
        sequential=rank_local.sequential_over_ranks)
    delta = cc_all - cc_without
    # population standard deviation, as DIALS
    cutoff = float(delta.mean() - stdcutoff * delta.std())
    below = np.flatnonzero(delta < cutoff)
    below = below[np.argsort(delta[below], kind="stable")]
    return DeltaCCHalfResult(groups, cc_all, cc_without, delta, cutoff, below)


# -- removal ----------------------------------------------------------------------------------
@dataclass
class Removal:
    removed_ids: List[int] = field(default_factory=list)
    removed_identifiers: List[str] = field(default_factory=list)
    image_ranges_removed: List[list] = field(default_factory=list)  # [[first, last], id]
    interior_below_cutoff: List[list] = field(default_factory=list)  # not at a sweep end
    n_reflections_removed: int = 0


def _scaled_count(table) -> int:
    return rank_local.total(table.get_flags(flags.scaled).sum())


def remove_datasets(experiments, table, ids, log):
    from ..selection import select_datasets

    removal = Removal()
    if not len(ids):
        return experiments, table, removal
    before = _scaled_count(table)
    removal.removed_ids = sorted(int(i) for i in ids)
    removal.removed_identifiers = [table.identifiers[i] for i in removal.removed_ids]
    if len(removal.removed_ids) >= len(experiments):
        raise VmergeError("ΔCC½ filtering would remove every dataset")
    experiments, table = select_datasets(experiments, table,
                                         exclude_datasets=removal.removed_ids)
    removal.n_reflections_removed = before - _scaled_count(table)
    return experiments, table, removal


def remove_image_groups(experiments, table, result: DeltaCCHalfResult, log):
    """Exclude the groups below the cutoff that lie at either end of their sweep (an end
    moves inwards as groups go, as DIALS); datasets left without valid images are removed."""
    from ..selection import apply_image_exclusions, select_datasets, valid_ranges

    groups = result.groups
    removal = Removal()
    before = _scaled_count(table)
    index_of_identifier = experiments.index_by_identifier()
    index_of_id = {key: index_of_identifier.get(ident, -1)
                   for key, ident in table.identifiers.items()}
    remaining: Dict[int, List[int]] = {}
    for g in range(groups.n):
        remaining.setdefault(int(groups.dataset[g]), []).append(g)
    candidates = sorted(int(g) for g in result.below)
    exclusions = []
    removed_any = True
    while removed_any and candidates:
        removed_any = False
        left = []
        for g in candidates:
            own = remaining[int(groups.dataset[g])]
            if own and (own[0] == g or own[-1] == g):
                own.remove(g)
                first, last = (int(v) for v in groups.image_range[g])
                key = int(groups.dataset[g])
                removal.image_ranges_removed.append([[first, last], key])
                exclusions.append((index_of_id[key], (first, last)))
                removed_any = True
            else:
                left.append(g)
        candidates = left
    for g in candidates:
        first, last = (int(v) for v in groups.image_range[g])
        removal.interior_below_cutoff.append([[first, last], int(groups.dataset[g])])
    if exclusions:
        apply_image_exclusions(experiments, table, exclusions)
        # the rows of excluded images no longer count as scaled
        excluded = table.get_flags(flags.user_excluded_in_scaling)
        table.unset_flags(excluded, flags.scaled)
    empty = [key for key, i in index_of_id.items()
             if i >= 0 and not experiments[i].is_still and not valid_ranges(experiments[i])]
    if empty:
        removal.removed_ids = sorted(empty)
        removal.removed_identifiers = [table.identifiers[k] for k in removal.removed_ids]
        experiments, table = select_datasets(experiments, table,
                                             exclude_datasets=removal.removed_ids)
    removal.n_reflections_removed = before - _scaled_count(table)
    return experiments, table, removal


# -- the cycles -------------------------------------------------------------------------------
def _merging_stats(table, experiments) -> Optional[dict]:
    """The per-cycle merging statistics in AnalysisResults._parse_merging_stats's layout."""
    from ..geometry import median_unit_cell, space_group
    from ..merging.api import scaled_observations
    from ..merging.statistics import merging_statistics

    cell = median_unit_cell(experiments)
    if rank_local.active():
        # each rank its own rows (whole groups): merging/rank_merge.py's statistics, the
        # one-process values on every rank
        from ..merging.rank_merge import _empty_observations, rank_merging_statistics

        statistics = rank_merging_statistics
        obs = (scaled_observations(table, experiments, unit_cell=cell) if table.nrows
               else _empty_observations())
    else:
        statistics = merging_statistics
        obs = scaled_observations(table, experiments, unit_cell=cell)
    try:
        stats = statistics(obs.miller_index, obs.intensity, obs.sigma,
                           space_group(experiments[0]), cell, n_bins=20, suggest_cut=False)
    except Exception:  # too few reflections for shells: the cycle is still reported
        return None
    overall = stats.overall
    return {
        "ccs": [s.cc_half for s in stats.shells],
        "rmerge": [s.r_merge for s in stats.shells],
        "rpim": [s.r_pim for s in stats.shells],
        "d_min": [s.d_min for s in stats.shells],
        "overall": {
            "cc_one_half": overall.cc_half,
            "r_merge": overall.r_merge,
            "r_pim": overall.r_pim,
            "i_over_sigma_mean": overall.i_over_sigma_mean,
            "completeness": 100 * overall.completeness,
            "n_obs": overall.n_obs,
        },
    }


def _image_ranges(experiments):
    from ..selection import valid_ranges

    return [None if e.is_still else [e.identifier, [list(r) for r in valid_ranges(e)]]
            for e in experiments]


def scale_and_filter(params, experiments, table, log, scale: Callable):
    """Cycles of scale(params, experiments, table, log) -> (experiments, table, summary) and
    ΔCC½ filtering; returns the last scaling's (experiments, table, summary), the summary
    with the filtering results under "filtering" (write_filter_results saves them)."""
    options = params.filtering.deltacchalf
    mode = options.mode
    if mode == "dataset" and len(experiments) < 2:
        raise VmergeError("filtering.method=deltacchalf: one dataset cannot be filtered in "
                          "mode=dataset; use filtering.deltacchalf.mode=image_group")
    if mode == "image_group" and all(e.is_still for e in experiments):
        raise VmergeError("filtering.deltacchalf.mode=image_group needs rotation data; use "
                          "mode=dataset for stills")
    from ..pipeline import scaling_cycles

    # under MPI every cycle (and the analysis between them) runs on the ranks' own rows
    # when the configuration allows (pipeline.scaling_cycles)
    with scaling_cycles(params, experiments):
        return _cycles(params, experiments, table, log, scale)


def _cycles(params, experiments, table, log, scale):
    options = params.filtering.deltacchalf
    mode = options.mode
    partiality_cutoff = params.cut_data.partiality_cutoff
    results = {"termination_reason": None, "initial_n_reflections": None,
               "initial_expids_and_image_ranges": None, "expids_and_image_ranges": None,
               "cycle_results": {}, "final_stats": None, "mode": mode}
    cumulative_removed = 0
    summary = None
    full_matrix = params.scaling_options.full_matrix
    final_full_matrix = _full_matrix_wanted(full_matrix, experiments)
    for cycle in range(1, options.max_cycles + 1):
        log.info(f"\nScale and filter: cycle {cycle} of at most {options.max_cycles}")
        params.scaling_options.full_matrix = False
        try:
            experiments, table, summary = scale(params, experiments, table, log)
        finally:
            params.scaling_options.full_matrix = full_matrix
        # As dials.scale: the dataset selection is done; later cycles scale what is left
        # (a removed or excluded id given again would be an error).
        params.dataset_selection.use_datasets = None
        params.dataset_selection.include_datasets = None
        params.dataset_selection.exclude_datasets = None
        if cycle == 1:
            results["initial_expids_and_image_ranges"] = [
                None if e.is_still else [e.identifier, list(e.scan["image_range"])]
                for e in experiments]
        stats = _merging_stats(table, experiments)
        data = delta_cc_half_input(table, experiments, partiality_cutoff)
        if results["initial_n_reflections"] is None:
            results["initial_n_reflections"] = data.n_scaled_rows
        groups = (dataset_groups(data) if mode == "dataset"
                  else image_groups(data, options.group_size))
        analysis = delta_cc_half_analysis(data, groups, options.stdcutoff)
        log.info(format_analysis(analysis, table))
        if mode == "dataset":
            below_ids = [int(groups.dataset[g]) for g in analysis.below]
            experiments, table, removal = remove_datasets(experiments, table, below_ids, log)
        else:
            experiments, table, removal = remove_image_groups(experiments, table, analysis, log)
        results["expids_and_image_ranges"] = _image_ranges(experiments)
        cumulative_removed += removal.n_reflections_removed
        percent = 100.0 * cumulative_removed / max(results["initial_n_reflections"], 1)
        labels, values = analysis.sorted_values()
        cycle_result = {
            "merging_stats": stats,
            "delta_cc_half_values": values,
            "delta_cc_half_groups": labels,
            "mean_cc_half": analysis.mean_cc_half,
            "cutoff_value": analysis.cutoff,
            "removed_datasets": removal.removed_identifiers,
            "removed_ids": removal.removed_ids,
            "n_removed": removal.n_reflections_removed,
            "cumul_percent_removed": percent,
        }
        if mode == "image_group":
            cycle_result["image_ranges_removed"] = removal.image_ranges_removed
        results["cycle_results"][str(cycle)] = cycle_result
        log.info(format_removal(cycle, removal, percent))
        reason = None
        if removal.n_reflections_removed == 0 and not removal.removed_ids:
            reason = "no_more_removed"
        elif percent > options.max_percent_removed:
            reason = "max_percent_removed"
        elif (options.min_completeness is not None and stats is not None
              and stats["overall"]["completeness"] < options.min_completeness):
            reason = "below_completeness_limit"
        elif cycle == options.max_cycles:
            reason = "max_cycles"
        if reason is not None:
            if reason != "no_more_removed" or final_full_matrix:
                log.info("Scale and filter: rescaling what is left")
                experiments, table, summary = scale(params, experiments, table, log)
                results["final_stats"] = _merging_stats(table, experiments)
            results["termination_reason"] = reason
            log.info(f"Scale and filter finished: {reason.replace('_', ' ')}")
            break
    summary = dict(summary or {})
    summary["filtering"] = results
    return experiments, table, summary


def _full_matrix_wanted(value, experiments) -> bool:
    """The user's full_matrix, auto resolved as the scaling engine does."""
    from ..model.base import is_auto
    from .algorithm import MAX_DATASETS_FOR_AUTO_FULL_MATRIX

    if is_auto(value) or value is None:
        return not (any(e.is_still for e in experiments)
                    or len(experiments) > MAX_DATASETS_FOR_AUTO_FULL_MATRIX)
    return bool(value)


def write_filter_results(params, summary) -> None:
    """scale_and_filter_results.json from the summary scale_and_filter returned."""
    from ..cli import write_json

    path = params.filtering.output.scale_and_filter_results
    if path and "filtering" in summary:
        write_json(path, _json_ready(summary["filtering"]))


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- log ---------------------------------------------------------------------------------------
MAX_LOGGED_GROUPS = 20


def format_analysis(result: DeltaCCHalfResult, table) -> str:
    groups = result.groups
    delta = result.delta_cc_half
    kind = "datasets" if groups.image_range is None else "image groups"
    lines = [f"ΔCC½ analysis of {groups.n} {kind}: CC½ {100 * result.mean_cc_half:.3f}%, "
             f"mean ΔCC½ {100 * delta.mean():.3f}%, sd {100 * delta.std():.3f}%, "
             f"cutoff {100 * result.cutoff:.3f}%"]
    order = np.argsort(delta, kind="stable")
    shown = order[:MAX_LOGGED_GROUPS]
    lines.append(f"  lowest ΔCC½ ({len(shown)} of {groups.n}; all in the JSON):")
    for g in shown:
        where = f"dataset {groups.dataset[g]}"
        if groups.image_range is not None:
            where += f" images {groups.image_range[g][0]}-{groups.image_range[g][1]}"
        mark = " (below cutoff)" if delta[g] < result.cutoff else ""
        lines.append(f"    {where}: ΔCC½ {100 * delta[g]:.3f}%{mark}")
    return "\n".join(lines)


def format_removal(cycle, removal: Removal, percent) -> str:
    lines = [f"Cycle {cycle} of filtering: {removal.n_reflections_removed} reflections removed "
             f"(cumulative {percent:.3f}%)"]
    for (first, last), key in removal.image_ranges_removed[:MAX_LOGGED_GROUPS]:
        lines.append(f"  removed images {first}-{last} of dataset {key}")
    for (first, last), key in removal.interior_below_cutoff[:MAX_LOGGED_GROUPS]:
        lines.append(f"  images {first}-{last} of dataset {key} are below the cutoff but not at "
                     "the end of a sweep: kept")
    more = (max(len(removal.image_ranges_removed) - MAX_LOGGED_GROUPS, 0)
            + max(len(removal.interior_below_cutoff) - MAX_LOGGED_GROUPS, 0))
    if more:
        lines.append(f"  ... and {more} more image groups (all in the JSON)")
    if removal.removed_ids:
        shown = ", ".join(str(i) for i in removal.removed_ids[:MAX_LOGGED_GROUPS])
        more = len(removal.removed_ids) - MAX_LOGGED_GROUPS
        lines.append(f"  removed datasets: {shown}" + (f" and {more} more" if more > 0 else ""))
    return "\n".join(lines)
