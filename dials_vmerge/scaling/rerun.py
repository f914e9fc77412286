"""Reruns on scaled data (ours or dials.scale's) reproduce the run that made them.

dials.scale, given scaled.expt/scaled.refl, starts from the stored model parameters and
inverse_scale_factor, reloads the final error model and Imid, clears every scaling flag and
skips the initial outlier pass (dials-scaling.md section 3.7 and item 15 of the pitfalls).
Each of these makes a rerun start elsewhere than the run it repeats: the final error model
(refined after the last outlier pass) flags fewer outliers, the first LBFGS round then runs
with the previous outliers included, the scale drifts along the direction the target cannot
see, and cuts that DIALS applied to partial pieces before summing them are applied again to
the summed rows. On the quartz example Rmerge went 0.113 -> 0.121 -> 0.129.

Here a rerun is a replay of the same scaling on the same prepared observations:
  * kept from the previous run: the scaling model's type and configuration (corrections,
    intervals, lmax, valid image range), the summed partials, and the rows its data
    preparation excluded (user cuts and the initial filter, both judged on the partial
    pieces; `user_excluded_in_scaling` and `excluded_for_scaling`);
  * started again: parameters at their null values, g = 1, the default error model, the
    initial outlier pass (outlier flags are cleared, as DIALS does), the Imid search;
  * new options (exclude_images/exclude_batches, cuts) act on top of that: d_min/d_max and
    partiality_cutoff flag this run's rows as a first run does; a min_isigi above its
    default flags this run's rows whose I/sigma is below it (restart_prepared_table).
So a rerun with no new options reproduces the previous run, and one with exclusions differs
only by what was excluded. A cut cannot be relaxed on a rerun (start from integrated data).
A min_isigi is judged on the rerun's rows, the summed partials as sums (the previous run
judged their pieces): repeating a first run's min_isigi on its rerun can flag a few summed
rows more.
"""

from __future__ import annotations

import numpy as np

from .. import flags

PREPARATION_FLAGS = flags.user_excluded_in_scaling | flags.excluded_for_scaling


def is_rescale(table) -> bool:
    """The table comes from a scaling run: it has the scaled output columns."""
    return "inverse_scale_factor" in table and "intensity.scale.value" in table


def clear_flags_for_rerun(table) -> None:
    """Unset outlier_in_scaling and scaled; keep the previous preparation's exclusions."""
    table.unset_flags(np.ones(table.nrows, dtype=bool),
                      flags.outlier_in_scaling | flags.scaled)


# A (dataset, original_index) pair packed in one int64: dataset << ORIGINAL_INDEX_BITS |
# original_index (pipeline.OUTPUT_ORDER_SHIFT: fewer than 2^40 rows per dataset).
ORIGINAL_INDEX_BITS = 40


class SuitableBefore:
    """Which rows the previous run's preparation kept, looked up as preparation's
    `original_index` numbers them: by (dataset, position among that dataset's rows)
    (prepare.rank_within_dataset). A table joining several datasets numbers each dataset
    from 0, so a row's original_index is not its row number in the table (issue 15: indexed
    as one, a multi-dataset rerun took other datasets' rows for its own and lost the
    previous run's exclusions).

    The rows are found by their explicit (dataset, original_index) values (a binary search),
    not by position: a rank of a rank-local MPI job (issue 11) holds only some rows of each
    dataset, numbered with their one-process original_index (pipeline.rank_local_rows), so
    positions among the rank's rows are not those numbers. original_index None: the rows
    are all of their datasets' rows and are numbered as preparation numbers them."""

    def __init__(self, suitable: np.ndarray, dataset_index=None, ids=None,
                 original_index=None):
        suitable = np.asarray(suitable, dtype=bool)
        if dataset_index is None:
            dataset = np.zeros(suitable.size, dtype=np.int64)
            self.dataset_of_id = None
        else:
            dataset = np.asarray(dataset_index, dtype=np.int64)
            ids = np.asarray(ids, dtype=np.int64)
            self.dataset_of_id = np.full(int(ids.max()) + 1 if ids.size else 0, -1,
                                         dtype=np.int64)
            self.dataset_of_id[ids] = dataset  # one dataset per id
        if original_index is None:
            from .prepare import rank_within_dataset

            original_index = rank_within_dataset(dataset_index, suitable.size)
        keys = _packed(dataset, original_index)
        if keys.size and np.any(keys[1:] <= keys[:-1]):
            # rows grouped dataset by dataset in input order (pipeline.group_rows_by_dataset)
            # are already ascending; other callers' rows are sorted here
            order = np.argsort(keys, kind="stable")
            keys, suitable = keys[order], suitable[order]
            if np.any(keys[1:] == keys[:-1]):
                raise ValueError("two rows with the same dataset and original_index")
        self.keys = keys
        self.suitable = suitable

    def of_rows(self, original_index, ids=None) -> np.ndarray:
        """Previous suitability of prepared rows, given their original_index and id."""
        if self.dataset_of_id is None:
            dataset = np.zeros(np.shape(original_index), dtype=np.int64)
        else:
            dataset = self.dataset_of_id[np.asarray(ids, dtype=np.int64)]
        wanted = _packed(dataset, original_index)
        at = np.searchsorted(self.keys, wanted)
        found = at < self.keys.size
        found[found] = self.keys[at[found]] == wanted[found]
        if not found.all():
            raise ValueError("a prepared row's (dataset, original_index) is not among the "
                             "rows before preparation")
        return self.suitable[at]


def _packed(dataset, original_index) -> np.ndarray:
    index = np.asarray(original_index).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= (1 << ORIGINAL_INDEX_BITS)):
        raise ValueError("original_index outside 0..2^40-1")
    return (np.asarray(dataset, dtype=np.int64) << ORIGINAL_INDEX_BITS) | index


def previously_suitable(table, dataset_index=None, original_index=None) -> SuitableBefore:
    """Rows neither user-excluded nor excluded_for_scaling (before this run's preparation);
    dataset_index: each row's dataset, as given to preparation; original_index: each row's
    original_index when the caller gives preparation its own (a rank-local job's rows)."""
    suitable = ~table.get_flags(PREPARATION_FLAGS, all=False)
    if dataset_index is None:
        return SuitableBefore(suitable, original_index=original_index)
    return SuitableBefore(suitable, dataset_index, table["id"], original_index)


def restart_prepared_table(table, suitable_before: SuitableBefore, intensity_choice="combine",
                           min_isigi=None) -> None:
    """g = 1 on every row; undo `excluded_for_scaling` that this run's initial filter set on
    rows the previous preparation kept: the previous run judged them as partial pieces, this
    one would judge the summed rows (I/sigma of a sum of pieces, each above min_isigi, can be
    below it). Except a min_isigi above its default: a cut given on this run, kept
    where the row's I/sigma (the filter's test, on this run's rows) is below it, as
    dials.scale cuts the rows of its scaled input on a rerun. Without it a stricter cut on a
    rerun was undone on every row the previous run kept. User cuts (d range, partiality:
    `user_excluded_in_scaling`) are never undone here, so they act on a rerun as given."""
    table["inverse_scale_factor"] = np.ones(table.nrows)
    if "original_index" not in table:
        return
    kept_before = suitable_before.of_rows(
        table["original_index"], table["id"] if suitable_before.dataset_of_id is not None else None)
    refilter = kept_before & table.get_flags(flags.excluded_for_scaling)
    if "variance" in table:
        refilter &= np.asarray(table["variance"]) > 0
    from .prepare import DEFAULT_MIN_ISIGI, isigi_selection

    if min_isigi is not None and min_isigi > DEFAULT_MIN_ISIGI and refilter.any():
        refilter &= ~isigi_selection(table, intensity_choice, min_isigi)
    if refilter.any():
        table.unset_flags(refilter, flags.excluded_for_scaling)


def restart_model(model, experiment) -> None:
    """Parameters back to their null values, no ESDs, no stored error model or Imid; the
    experiment then counts as not scaled before (initial outlier pass, default error model)."""
    for component in model.components.values():
        if component.n_parameters:
            component.set_parameters(np.full(component.n_parameters,
                                             float(component.null_parameter_value)))
    model.set_est_standard_devs(None)
    for key in ("error_model_type", "error_model_parameters", "Imid"):
        model.configdict.pop(key, None)
    experiment.scaling_model = None
