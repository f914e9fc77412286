"""Per-dataset data preparation before scaling (dials-scaling.md section 3).

Order, as dials.scale runs it on each dataset:
  1. clear the three scaling-exclusion flags and `scaled` (every run starts fresh),
  2. user exclusions: d range and partiality cut -> `user_excluded_in_scaling`,
  3. initial filter -> `excluded_for_scaling`, plus the `original_index` column,
  4. summation of split partials (first piece kept, others deleted),
  5. `inverse_scale_factor` initialised to 1 unless the run is a rescale,
  6. prescaling correction (lp/qe), initial `intensity`/`variance` columns; V <= 0 excluded.
The user cut and the filter both see the pre-summation partiality, so a piece cut for a low
partiality stays excluded even when the summed partiality would pass (DIALS behaviour).
Everything here is vectorised numpy over columns; no Python loop touches a reflection.
"""

from __future__ import annotations

import numpy as np

from .. import flags

SCALING_FLAGS = (
    flags.user_excluded_in_scaling
    | flags.outlier_in_scaling
    | flags.excluded_for_scaling
    | flags.scaled
)

# Partials with a piece at or above this partiality are treated as full (DIALS constant).
FULL_PARTIALITY = 0.99
# cut_data.min_isigi's default (phil: input): the initial filter's I/sigma cut; a rerun
# treats a min_isigi above it as a cut given on that run (rerun.restart_prepared_table)
DEFAULT_MIN_ISIGI = -5.0


def clear_scaling_flags(table) -> None:
    """Unset user_excluded/outlier/excluded_for_scaling and scaled on every row."""
    table.unset_flags(np.ones(table.nrows, dtype=bool), SCALING_FLAGS)


def _has(table, name):
    return name in table


def _isigma(value, variance):
    """I/sigma with NaN where sigma is undefined (NaN never passes or fails a cut)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return value / np.sqrt(variance)


def user_exclusion_selection(table, d_min=None, d_max=None, partiality_cutoff=None, d_values=None):
    """Rows cut by the user's d range or partiality cut (cut_data.*); True means excluded.

    d_values: d per row from the best (median) cell, as dials.scale uses; defaults to `d`.
    """
    excluded = np.zeros(table.nrows, dtype=bool)
    if d_min is not None or d_max is not None:
        d = table["d"] if d_values is None else np.asarray(d_values)
        if d_min is not None:
            excluded |= d < d_min
        if d_max is not None:
            excluded |= d > d_max
    if partiality_cutoff is not None and _has(table, "partiality"):
        excluded |= table["partiality"] < partiality_cutoff
    return excluded


def apply_user_exclusions(table, d_min=None, d_max=None, partiality_cutoff=None, d_values=None):
    sel = user_exclusion_selection(table, d_min, d_max, partiality_cutoff, d_values)
    table.set_flags(sel, flags.user_excluded_in_scaling)
    return sel


def filter_intensity_types(table, intensity_choice):
    """Which intensity estimates the initial filter checks ('sum', 'prf' or both)."""
    has_prf = _has(table, "intensity.prf.value")
    has_sum = _has(table, "intensity.sum.value")
    if intensity_choice == "combine":
        if has_prf and has_sum:
            return ("sum", "prf")
        return ("sum",) if has_sum else ("prf",)
    if intensity_choice == "profile":
        return ("prf",)
    return ("sum",)


def initial_filter_selection(table, intensity_choice="combine", partiality_cutoff=0.25,
                             min_isigi=DEFAULT_MIN_ISIGI):
    """Rows that fail the initial filter (True = excluded_for_scaling). Section 3.1."""
    kinds = filter_intensity_types(table, intensity_choice)
    flag_bits = table["flags"]
    bad = table["id"] < 0
    integrated_mask = 0
    for kind in kinds:
        integrated_mask |= flags.integrated_prf if kind == "prf" else flags.integrated_sum
    bad |= (flag_bits & np.uint64(integrated_mask)) == 0
    for kind in kinds:
        bit = np.uint64(flags.integrated_prf if kind == "prf" else flags.integrated_sum)
        is_integrated = (flag_bits & bit) != 0
        variance = table[f"intensity.{kind}.variance"]
        bad |= is_integrated & ~(variance > 0)
    for qe_name in ("qe", "dqe"):
        if _has(table, qe_name):
            bad |= ~(table[qe_name] > 0)
            break
    if partiality_cutoff is not None and _has(table, "partiality"):
        bad |= table["partiality"] < partiality_cutoff
    if min_isigi is not None:
        bad |= isigi_selection(table, intensity_choice, min_isigi)
    return bad


def isigi_selection(table, intensity_choice, min_isigi):
    """Rows whose I/sigma is below min_isigi for an intensity type the initial filter
    checks (the filter's min_isigi test alone; a rerun re-applies it: rerun.py)."""
    below = np.zeros(table.nrows, dtype=bool)
    for kind in filter_intensity_types(table, intensity_choice):
        isig = _isigma(table[f"intensity.{kind}.value"], table[f"intensity.{kind}.variance"])
        below |= isig < min_isigi
    return below


def apply_initial_filter(table, intensity_choice="combine", partiality_cutoff=0.25,
                         min_isigi=DEFAULT_MIN_ISIGI, dataset_index=None, original_index=None):
    """Flag filter failures excluded_for_scaling and number rows in `original_index`
    (within each dataset, as dials.scale numbers each dataset's table). original_index: the
    numbers when the caller knows them (a rank-local job's rank holds only some rows of each
    dataset: pipeline.rank_local_rows)."""
    bad = initial_filter_selection(table, intensity_choice, partiality_cutoff, min_isigi)
    table.set_flags(bad, flags.excluded_for_scaling)
    table["original_index"] = (rank_within_dataset(dataset_index, table.nrows)
                               if original_index is None else original_index)
    return bad


def rank_within_dataset(dataset_index, n_rows):
    """Each row's position among the rows of its dataset (0, 1, ... per dataset)."""
    if dataset_index is None:
        return np.arange(n_rows, dtype=np.uint64)
    from ..kernels.flat import rows_by_dataset

    dataset_index = np.asarray(dataset_index, dtype=np.int64)
    n_datasets = int(dataset_index.max()) + 1 if dataset_index.size else 0
    order, offsets = rows_by_dataset(dataset_index, n_datasets)
    rank = np.empty(n_rows, dtype=np.uint64)
    rank[order] = (np.arange(n_rows, dtype=np.int64)
                   - np.repeat(offsets[:-1], np.diff(offsets))).astype(np.uint64)
    return rank


def select_rows(table, keep, consume_input=False):
    """table.select(keep); with consume_input, column by column, each input column deleted
    once copied, so the input and its selection never both exist in full."""
    if not consume_input:
        return table.select(keep)
    # The table's consuming split keeps file-backed columns unread (row indices only).
    return table.split([np.flatnonzero(keep)], consume=True)[0]


def sum_partial_reflections(table, consume_input=False, dataset_index=None):
    """Merge split partials sharing a `partial_id` into their first piece; others deleted.

    dataset_index (per row, optional): partials are summed per (dataset, partial_id), as
    dials.scale does on each dataset's table; files number partial_id from 0 each.

    Candidates: partiality < 0.99 and variance > 0 for every intensity type present.
    Kept piece: partiality = sum p, sum I/V added, prf I weighted by (I/sigma)^2 with
    V = sum(w V)/sum(w), scale I/V inverse-variance weighted, flags of the first piece.
    Returns the new table (or the same one when nothing is summed). consume_input: empty
    the input table while building the new one (see select_rows).
    """
    if not (_has(table, "partiality") and _has(table, "partial_id")):
        return table
    kinds = [k for k in ("sum", "prf", "scale") if _has(table, f"intensity.{k}.value")]
    candidate = table["partiality"] < FULL_PARTIALITY
    for kind in kinds:
        candidate &= table[f"intensity.{kind}.variance"] > 0
    rows = np.flatnonzero(candidate)
    if rows.size == 0:
        return table
    pid = table["partial_id"][rows]
    if dataset_index is None and _has(table, "id"):
        # every integration run numbers partial_id from 0, so a table joining several files
        # repeats them: one group per (dataset id, partial_id), as dials.merge
        dataset_index = table["id"]
    if dataset_index is None:
        order = np.argsort(pid, kind="stable")
    else:  # lexsort is stable: by dataset, then partial_id, then row
        order = np.lexsort((pid, np.asarray(dataset_index)[rows]))
    rows = rows[order]  # within one partial_id, ascending row index: first piece first
    pid = pid[order]
    new_piece = np.r_[True, pid[1:] != pid[:-1]]
    if dataset_index is not None:
        dataset_of_row = np.asarray(dataset_index)[rows]
        new_piece |= np.r_[True, dataset_of_row[1:] != dataset_of_row[:-1]]
    starts = np.flatnonzero(new_piece)
    sizes = np.diff(np.r_[starts, rows.size])
    multi = sizes > 1
    if not multi.any():
        return table
    first_rows = rows[starts[multi]]
    member_group = np.repeat(np.arange(starts.size), sizes)
    in_multi = multi[member_group]
    member_rows = rows[in_multi]
    # reduceat needs segment starts in the compacted member list
    seg_sizes = sizes[multi]
    seg_starts = np.r_[0, np.cumsum(seg_sizes)[:-1]]

    def segsum(values):
        return np.add.reduceat(values, seg_starts)

    new = {}
    new["partiality"] = segsum(table["partiality"][member_rows])
    if "sum" in kinds:
        new["intensity.sum.value"] = segsum(table["intensity.sum.value"][member_rows])
        new["intensity.sum.variance"] = segsum(table["intensity.sum.variance"][member_rows])
    if "prf" in kinds:
        i_prf = table["intensity.prf.value"][member_rows]
        v_prf = table["intensity.prf.variance"][member_rows]
        w = i_prf * i_prf / v_prf
        sw = segsum(w)
        # all-zero prf intensities give no weight; fall back to the plain mean then
        nonzero = sw > 0
        plain = np.add.reduceat(np.ones_like(w), seg_starts)
        new["intensity.prf.value"] = np.where(
            nonzero, segsum(w * i_prf) / np.where(nonzero, sw, 1), segsum(i_prf) / plain)
        new["intensity.prf.variance"] = np.where(
            nonzero, segsum(w * v_prf) / np.where(nonzero, sw, 1), segsum(v_prf) / plain)
    if "scale" in kinds:
        i_sc = table["intensity.scale.value"][member_rows]
        v_sc = table["intensity.scale.variance"][member_rows]
        inv = 1.0 / v_sc
        new["intensity.scale.value"] = segsum(inv * i_sc) / segsum(inv)
        new["intensity.scale.variance"] = 1.0 / segsum(inv)

    keep = np.ones(table.nrows, dtype=bool)
    keep[member_rows] = False
    keep[first_rows] = True
    for name, values in new.items():
        column = table[name].copy()
        column[first_rows] = values
        table[name] = column
    return select_rows(table, keep, consume_input)


def prescaling_correction(table):
    """c = lp / qe (qe, else dqe; 1/qe taken as 1 where qe <= 0); 1 where columns absent."""
    correction = np.array(table["lp"], dtype=np.float64) if _has(table, "lp") else np.ones(table.nrows)
    for qe_name in ("qe", "dqe"):
        if _has(table, qe_name):
            qe = table[qe_name]
            positive = qe > 0
            inv_qe = np.ones(table.nrows)
            inv_qe[positive] = 1.0 / qe[positive]
            correction = correction * inv_qe
            break
    return correction


def summation_intensities(table, correction):
    """Summation intensity and variance corrected by c/p (1/p taken as 1 where p <= 0)."""
    factor = correction.copy()
    if _has(table, "partiality"):
        p = table["partiality"]
        positive = p > 0
        factor[positive] = factor[positive] / p[positive]
    intensity = table["intensity.sum.value"] * factor
    variance = table["intensity.sum.variance"] * factor * factor
    if _has(table, "partiality.inv.variance"):
        # stills: uncertainty of 1/p propagated as (I_sum c)^2 var(1/p)
        corrected = table["intensity.sum.value"] * correction
        variance = variance + corrected * corrected * table["partiality.inv.variance"]
    return intensity, variance


def profile_intensities(table, correction):
    """Profile intensity and variance corrected by c (never divided by partiality)."""
    return (table["intensity.prf.value"] * correction,
            table["intensity.prf.variance"] * correction * correction)


def has_usable_profile(table):
    return _has(table, "intensity.prf.value") and bool(
        table.get_flags(flags.integrated_prf).any())


def choose_initial_intensities(table, intensity_choice="combine", dataset_index=None):
    """Write `prescaling_correction`, `intensity`, `variance`; flag V <= 0 excluded.

    profile: prf*c. sum/combine: sum*c/p, then for combine prf*c overwrites rows flagged
    integrated_prf. Falls back to summation when there is no usable profile column.
    """
    from ..backends import rank_local

    correction = prescaling_correction(table)
    table["prescaling_correction"] = correction
    # rank-local job: the profile's presence is decided over every rank's rows
    use_profile = rank_local.any_rank(has_usable_profile(table))
    if use_profile and dataset_index is not None:
        # per dataset, as on each dataset's own table: a dataset without any
        # profile-integrated row falls back to summation
        dataset_index = np.asarray(dataset_index, dtype=np.int64)
        with_prf = rank_local.totals(_count_per_dataset(
            dataset_index, table.get_flags(flags.integrated_prf))) > 0
        use_profile = with_prf[dataset_index]
    if intensity_choice == "profile" and np.all(use_profile):
        intensity, variance = profile_intensities(table, correction)
    else:
        intensity, variance = summation_intensities(table, correction)
        if intensity_choice == "profile" and np.any(use_profile):
            i_prf, v_prf = profile_intensities(table, correction)
            intensity = np.where(use_profile, i_prf, intensity)
            variance = np.where(use_profile, v_prf, variance)
        elif intensity_choice == "combine" and np.any(use_profile):
            prf_rows = table.get_flags(flags.integrated_prf) & use_profile
            i_prf, v_prf = profile_intensities(table, correction)
            intensity = np.where(prf_rows, i_prf, intensity)
            variance = np.where(prf_rows, v_prf, variance)
    table["intensity"] = intensity
    table["variance"] = variance
    table.set_flags(~(variance > 0), flags.excluded_for_scaling)
    return table


def initialise_inverse_scale_factor(table, dataset_index=None):
    """g = 1 unless the column holds a previous run's values (rescale), per dataset."""
    if "inverse_scale_factor" not in table:
        table["inverse_scale_factor"] = np.ones(table.nrows)
        return
    from ..backends import rank_local

    g = table["inverse_scale_factor"]
    if dataset_index is None:
        if not rank_local.any_rank(np.any(g)):
            table["inverse_scale_factor"] = np.ones(table.nrows)
        return
    dataset_index = np.asarray(dataset_index, dtype=np.int64)
    scaled_before = rank_local.totals(_count_per_dataset(dataset_index, g != 0)) > 0
    fresh = ~scaled_before[dataset_index]
    if fresh.any():
        g = np.array(g, dtype=np.float64)
        g[fresh] = 1.0
        table["inverse_scale_factor"] = g


def _count_per_dataset(dataset_index, mask):
    """Rows with `mask` per dataset (integer counts: summed over the ranks of a rank-local
    job), the same length on every rank (the datasets' count, from the job's datasets)."""
    from ..backends import rank_local

    n = int(dataset_index.max()) + 1 if dataset_index.size else 0
    if rank_local.active():
        n = int(rank_local.maximum(float(n), empty=0.0))
    return np.bincount(dataset_index[np.asarray(mask, dtype=bool)], minlength=n)


def prepare_dataset(table, intensity_choice="combine", partiality_cutoff=0.25, min_isigi=DEFAULT_MIN_ISIGI,
                    d_min=None, d_max=None, d_values=None, clear_flags=True,
                    consume_input=False, dataset_index=None, original_index=None):
    """Run steps 1-6 on one dataset's table; returns the new table (rows may be removed).

    d_values: per-row d from the best cell for the d-range cut (default: the `d` column).
    consume_input: the caller no longer needs `table`; its columns are moved into the
    result (when partials are summed, input and output then never coexist in memory).
    dataset_index: per row, its dataset (0..n-1) when the table holds several datasets:
    partials are summed, rows numbered and g and intensities initialised per dataset.
    """
    if clear_flags:
        clear_scaling_flags(table)
    apply_user_exclusions(table, d_min, d_max, partiality_cutoff, d_values)
    apply_initial_filter(table, intensity_choice, partiality_cutoff, min_isigi, dataset_index,
                         original_index)
    table, dataset_index = _sum_partials_keeping_index(table, consume_input, dataset_index)
    initialise_inverse_scale_factor(table, dataset_index)
    choose_initial_intensities(table, intensity_choice, dataset_index)
    return table


def _sum_partials_keeping_index(table, consume_input, dataset_index):
    if dataset_index is None:
        return sum_partial_reflections(table, consume_input), None
    n_before = table.nrows
    # the dataset index travels as a column through the row selection of the summation
    table["__dataset_index"] = np.asarray(dataset_index, dtype=np.int64)
    table = sum_partial_reflections(table, consume_input, dataset_index)
    dataset_index = np.array(table["__dataset_index"]) if table.nrows != n_before else \
        np.asarray(dataset_index, dtype=np.int64)
    table.del_column("__dataset_index")
    return table, dataset_index


def suitable_selection(table):
    """Rows that scaling may use: neither user-excluded nor excluded_for_scaling."""
    return ~table.get_flags(flags.user_excluded_in_scaling | flags.excluded_for_scaling,
                            all=False)


def d_from_unit_cell(miller_index, unit_cell):
    """d spacing of each index in a cctbx unit cell (for the best-cell d-range cut)."""
    from ..merging.groups import per_index_chunks

    return per_index_chunks(miller_index, unit_cell.d)


def median_unit_cell(unit_cells):
    """The median of each cell parameter over experiments (DIALS best_unit_cell default)."""
    from cctbx import uctbx

    params = np.array([uc.parameters() for uc in unit_cells])
    return uctbx.unit_cell(tuple(np.median(params, axis=0)))
