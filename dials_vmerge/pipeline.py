"""The dials.vmerge job as one straight line:

read -> select -> models -> scale (prepare, minimise, error model, outliers) -> write scaled
files -> merge -> statistics -> write merged files. Each stage is a library call; this module
only wires them together and reports.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

from . import flags
from .batches import format_batch_table
from .errors import VmergeError
from .memory import heap_top_retained, release_free_memory
from .model.base import is_auto, param
from .geometry import image_range, space_group_info
from .selection import (
    apply_image_exclusions,
    batches_to_image_exclusions,
    drop_empty_datasets,
    flag_rows_outside_valid_ranges,
    freeze_batch_offsets,
    id_of_experiment,
    parse_exclude_images,
    rows_of_experiments,
    select_datasets,
    valid_ranges,
)


def check_consistent_space_groups(experiments) -> None:
    groups = {}
    number_of_symbol = {}  # one cctbx look-up per distinct symbol (20 000 stills: 7 s)
    for e in experiments:
        symbol = (e.crystal or {}).get("space_group_hall_symbol") if isinstance(
            e.crystal, dict) else None
        if symbol is None or symbol not in number_of_symbol:
            number = space_group_info(e).type().number()
            if symbol is not None:
                number_of_symbol[symbol] = number
        else:
            number = number_of_symbol[symbol]
        groups.setdefault(number, []).append(e.identifier)
    if len(groups) > 1:
        names = ", ".join(f"{n} ({len(ids)} experiment(s))" for n, ids in sorted(groups.items()))
        raise VmergeError(f"experiments have different space groups (numbers {names}); scale them separately")


def check_usable_intensities(table, path_hint: str = "the reflection file") -> None:
    """In a rank-local job (backends/rank_local.py) each rank checks its own rows and the
    decisions are taken over all ranks, so every rank raises the same error."""
    from .backends import rank_local

    has = [c for c in ("intensity.prf.value", "intensity.sum.value") if c in table]
    if not has:
        raise VmergeError(f"{path_hint}: no intensity.sum.value or intensity.prf.value column")
    # A read-once check: peek, so the columns are not kept in the table (or in memory).
    any_positive_variance = False
    for column in has:
        variance = column.replace(".value", ".variance")
        if variance not in table:
            raise VmergeError(f"{path_hint}: has {column} but no {variance} column")
        variances = table.peek(variance)
        finite = bool(np.all(np.isfinite(table.peek(column)))) and bool(
            np.all(np.isfinite(variances)))
        if not rank_local.all_ranks(finite):
            raise VmergeError(f"{path_hint}: {column} or its variance holds NaN or infinite values")
        any_positive_variance = any_positive_variance or bool(np.any(variances > 0))
    if not rank_local.any_rank(any_positive_variance):
        raise VmergeError(f"{path_hint}: every intensity variance is zero or negative")
    if "xyzobs.px.value" not in table:
        raise VmergeError(f"{path_hint}: no xyzobs.px.value column (needed for image numbers)")


def select(params, experiments, table, log):
    """Dataset, image and batch selection; returns the experiments and table to scale and
    {experiment index: new valid-image envelope} for the experiments an exclusion changed.

    As DIALS, the scaling flags of a previous run are cleared first, then the scans' stored
    valid image ranges and the new exclusions are applied."""
    from .scaling.prepare import clear_scaling_flags

    offsets = freeze_batch_offsets(experiments)
    log.info("\n" + format_batch_table(experiments, offsets) + "\n")
    selection = params.dataset_selection
    use = selection.use_datasets or selection.include_datasets
    experiments, table = select_datasets(experiments, table, use, selection.exclude_datasets)
    from .scaling import rerun

    if rerun.is_rescale(table):
        rerun.clear_flags_for_rerun(table)  # issue 15: a rerun replays the previous run
    else:
        clear_scaling_flags(table)
    for e in experiments:
        if not e.is_still:
            # DIALS records the scan's valid range for every experiment it scales.
            ranges = e.scan.get("valid_image_ranges") or {}
            if e.identifier not in ranges:
                e.scan["valid_image_ranges"] = {**ranges, e.identifier: [list(image_range(e))]}
    flag_rows_outside_valid_ranges(experiments, table)
    exclusions = parse_exclude_images(params.exclude_images, experiments, table)
    exclusions += batches_to_image_exclusions(params.exclude_batches, experiments)
    changed = apply_image_exclusions(experiments, table, exclusions)
    for index, envelope in sorted(changed.items()):
        e = experiments[index]
        if envelope is None:
            table.set_flags(table["id"] == id_of_experiment(table, e), flags.user_excluded_in_scaling)
            log.info(f"Dataset {id_of_experiment(table, e)}: all images excluded")
        else:
            log.info(
                f"Dataset {id_of_experiment(table, e)}: valid image ranges now "
                + ", ".join(f"{a}-{b}" for a, b in e.scan["valid_image_ranges"][e.identifier])
            )
    return experiments, table, changed


def group_rows_by_dataset(experiments, table):
    """The table's rows reordered dataset by dataset in experiment order (each dataset's
    rows in their input order), rows of no experiment dropped; and each row's dataset."""
    rows = rows_of_experiments(table, experiments)
    order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    dataset_index = np.repeat(np.arange(len(rows), dtype=np.int64), [r.size for r in rows])
    if order.size != table.nrows or np.any(order[1:] < order[:-1]):
        table = table.split([order], consume=True)[0]
    return table, dataset_index


def prepare_for_scaling(params, experiments, table, dataset_index=None):
    """Data preparation (filter, partial summation, intensities) keeping our selection flags,
    on the whole table (per dataset where DIALS works per dataset: dataset_index)."""
    from .geometry import median_unit_cell
    from .scaling.prepare import d_from_unit_cell, prepare_dataset

    from .scaling import rerun

    cut = params.cut_data
    d_values = None
    if cut.d_min is not None or cut.d_max is not None:
        d_values = d_from_unit_cell(table.peek("miller_index"), median_unit_cell(experiments))
    # a rank-local job's rows carry their one-process original_index (set at the partition)
    original_index = None
    if RANK_ORIGINAL_INDEX in table:
        original_index = np.asarray(table[RANK_ORIGINAL_INDEX], dtype=np.uint64)
        table.del_column(RANK_ORIGINAL_INDEX)
    # a rerun looks the previous preparation's exclusions up by (dataset, original_index):
    # the numbers preparation gives, a rank's own rows included (issue 11)
    suitable_before = (rerun.previously_suitable(table, dataset_index, original_index)
                       if rerun.is_rescale(table) else None)
    prepared = prepare_dataset(
        table,
        intensity_choice=params.reflection_selection.intensity_choice,
        partiality_cutoff=cut.partiality_cutoff,
        min_isigi=cut.min_isigi,
        d_min=cut.d_min,
        d_max=cut.d_max,
        d_values=d_values,
        clear_flags=False,
        consume_input=True,
        dataset_index=dataset_index,
        original_index=original_index,
    )
    if suitable_before is not None:
        rerun.restart_prepared_table(prepared, suitable_before,
                                     params.reflection_selection.intensity_choice,
                                     cut.min_isigi)
    return prepared


def run_scaling_job(params, experiments, table, log, rank_rows=None):
    """Everything dials.vmerge does; returns (experiments, scaled table, merge result).

    Under MPI with a supported configuration (rank_local_supported) the job is rank-local
    (issue 11, backends/rank_local.py): each rank selects, prepares and scales only the rows
    of its own unique reflections (rank_local_rows), every decision and log line is taken
    from values reduced over the ranks, and the returned table holds the rank's rows with
    `output_order_key` (see OUTPUT_ORDER_SHIFT) giving their place in the one-process
    scaled.refl row order.

    rank_rows: a RankRows (rank_local_input) whose `table` (or a copy of it) is `table`:
    the input is already this rank's rows, partitioned once for several jobs
    (cross-validation), and the job takes them as they are."""
    from .backends import rank_local

    cycles = _scaling_cycles[-1] if _scaling_cycles else None
    # issue 11: each MPI rank holds and scales only its own rows (rank_local_supported);
    # reruns on scaled data too (their previous exclusions are looked up by one-process
    # original_index: prepare_for_scaling); a job of scaling_cycles as decided for all
    enabled = (cycles.enabled if cycles is not None
               else rank_local_enabled(params, len(experiments)))
    # the job's stages replace the table as they go: no frame here keeps the input alive
    holder = [table]
    del table
    with rank_local.rank_local_job(enabled) as local:
        if rank_rows is not None and not local:
            # a rank's own rows scaled as if they were all the rows: a wrong result
            raise VmergeError("internal error: rank-local rows given to a job that is not "
                              "rank-local")
        return _run_scaling_job(params, experiments, holder, log, local, cycles, rank_rows)


def rank_local_enabled(params, n_datasets: int) -> bool:
    """Whether run_scaling_job with these parameters runs rank-local under MPI (more than one
    rank: rank_local.rank_local_job)."""
    return bool(RANK_LOCAL_OUTPUT_READY and USE_READ_TIME_KEY_BLOCKS
                and rank_local_supported(params, n_datasets))


class ScalingCycles:
    """Scaling jobs run one after the other, each on the scaled table of the one before less
    what was removed in between (filtering.method=deltacchalf's cycles: scaling/filtering.py).

    enabled: whether the jobs are rank-local, decided once for all of them (a later job
    with fewer datasets must not change it: its table is the earlier job's, held by rank).
    partition: the first job's read-time key blocks and rank ranges (None until it ran),
    kept by every later job, in one process as under MPI. A rank holds the rows of its key
    range of that partition from the first job on; blocks recut from a later job's fewer
    rows would put rank boundaries elsewhere, i.e. move rows between ranks (and the block
    sums' rank boundaries must be block boundaries). One process used to recut them: its
    later cycles' sums now group their terms by the first job's blocks (README, issue 11)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.partition = None
        self.started = False


_scaling_cycles = []


@contextmanager
def scaling_cycles(params, experiments):
    """Scaling jobs in the enclosed block are ScalingCycles (rank-local together, under
    MPI, if the first job's configuration is), and so is the work between them: the block
    runs inside rank_local.rank_local_job, so its stages reduce over the ranks."""
    from .backends import rank_local

    cycles = ScalingCycles(rank_local_enabled(params, len(experiments)))
    _scaling_cycles.append(cycles)
    try:
        with rank_local.rank_local_job(cycles.enabled):
            yield cycles
    finally:
        _scaling_cycles.pop()


class RankRows:
    """This rank's rows of an input, partitioned once for several rank-local jobs
    (rank_local_rows' partition, row keys and table): each job takes a copy of `table`
    (lazy columns stay in their file) and its own view of the row keys (a job releases
    the keys it was given after its one look-up: partition_asu_of_rows)."""

    def __init__(self, partition, row_keys, table):
        self.partition, self.row_keys, self.table = partition, row_keys, table

    def for_job(self):
        """(the partition, the row keys for one job)."""
        import copy

        return self.partition, (None if self.row_keys is None else copy.copy(self.row_keys))


def rank_local_input(experiments, holder):
    """RankRows of the input table holder.pop() (the caller's only reference: the input,
    with the `id` column every rank reads whole, is not kept)."""
    partition, row_keys, own = rank_local_rows(experiments, holder.pop())
    return RankRows(partition, row_keys, own)


def _run_scaling_job(params, experiments, holder, log, local, cycles=None, rank_rows=None):
    from .model.factory import create_scaling_model
    from .scaling.algorithm import scale_table

    table = holder.pop()

    check_consistent_space_groups(experiments)
    if not local:
        check_usable_intensities(table)
    if params.scaling_options.reference:  # a missing reference fails before any work
        from .io.reference import check_reference_path

        check_reference_path(params.scaling_options.reference)
    from .progress import stage

    # Until the prepared table exists the run holds about half its peak RSS: the heaps'
    # free top stays mapped here (fewer page faults; memory.heap_top_retained).
    with heap_top_retained():
        # issue 11: the read-time key blocks of every block sum of this job, cut from the
        # input rows (the same for any number of MPI ranks, one process included), once
        # switched on
        later_cycle = cycles is not None and cycles.started
        if later_cycle:
            # the first cycle's key blocks (ScalingCycles); the grouping maps the ASU
            # indices itself
            partition, row_keys = cycles.partition, None
        if local:
            if later_cycle:
                # the table is this rank's rows of the job before (its key range)
                table = later_cycle_rank_rows(experiments, table)
            elif rank_rows is None:
                # every rank maps all rows' keys (8 B per input row, held until the rank's
                # rows are chosen) and keeps its own rows; the intensities are checked on
                # them
                partition, row_keys, table = rank_local_rows(experiments, table)
            else:  # partitioned once before this job (RankRows)
                partition, row_keys = rank_rows.for_job()
            from .backends import mpi_world

            rows_per_rank = mpi_world.allgather_rows(np.array([table.nrows], dtype=np.int64))
            log.info("MPI: scaling each rank's own unique reflections (rows per rank "
                     f"{' / '.join(str(int(n)) for n in rows_per_rank)} of "
                     f"{int(rows_per_rank.sum())})")
            check_usable_intensities(table)
        elif not later_cycle:
            partition, row_keys = (read_time_keyed_partition(experiments, table)
                                   if USE_READ_TIME_KEY_BLOCKS else (None, None))
        if cycles is not None and not later_cycle:
            cycles.partition, cycles.started = partition, True
        with stage(log, "Selection"):
            experiments, table, _ = select(params, experiments, table, log)
        from .unit_cells import check_unit_cells_of_table

        check_unit_cells_of_table(experiments, table, log, params.allow_inconsistent_cells)
        experiments, table = drop_empty_datasets(experiments, table, log)

        if params.model == "KB" and len(experiments) == 1 and not params.scaling_options.reference:
            raise VmergeError(
                "model=KB: a single dataset cannot be scaled with the KB model (its scale is "
                "degenerate with the merged intensities); use model=physical or add datasets"
            )
        # One table for all datasets, grouped by dataset; prepared as a whole.
        with stage(log, "Preparation"):
            table, dataset_index = group_rows_by_dataset(experiments, table)
            table = prepare_for_scaling(params, experiments, table, dataset_index)
    del dataset_index
    # Preparation read columns it did not change (d, lp, qe, miller_index, ...): give them
    # back to the file; later stages read what they need without keeping it (peek).
    table.release_unchanged()
    release_free_memory()
    dataset_rows = rows_of_experiments(table, experiments)
    for key, e in zip(table.identifiers, experiments):
        existing = (e.scaling_model or {}).get("__id__")
        chosen = None if is_auto(params.model) else params.model
        if chosen and existing and existing != chosen and not params.overwrite_existing_models:
            log.warning(
                f"Warning: model={params.model} is not applied to dataset {id_of_experiment(table, e)}, "
                f"which already has a {existing} model (as dials.scale); set "
                "overwrite_existing_models=True to replace it"
            )
    from .table import RowView

    models = []
    for e, rows in zip(experiments, dataset_rows):
        model = create_scaling_model(params, e, RowView(table, rows))
        if not e.is_still:
            # As DIALS's scaler factory: a new model covers the scan; any model is then
            # limited to the envelope of the scan's valid image ranges.
            if "valid_image_range" not in model.configdict:
                model.set_valid_image_range(*image_range(e))
            ranges = valid_ranges(e)
            envelope = [ranges[0][0], ranges[-1][1]] if ranges else None
            if envelope and list(model.configdict["valid_image_range"]) != envelope:
                model.limit_image_range(*envelope)
        if e.scaling_model:
            from .scaling.rerun import restart_model

            restart_model(model, e)  # issue 15: a rerun replays the previous run
        models.append(model)
    choose_compute_device(params, log)
    from .backends.rank_partition import job_partition

    with stage(log, "Scaling"), job_partition(partition, row_keys):
        scaled, models, summary = scale_table(experiments, table, dataset_rows, models,
                                              params, log.info)
    del table
    release_free_memory()  # the scaling run's state is gone: writing starts from live data
    log.info(format_scaling_summary(experiments, models, summary))
    from .dataset_summary import per_dataset_table

    # every dataset's numbers for the JSON (the log summarises above 20 datasets)
    summary["per_dataset"] = per_dataset_table(summary.get("experiments", experiments),
                                               models, summary)
    kept = summary.pop("experiments", None)
    if kept is not None and len(kept) != len(experiments):
        experiments = experiments.select([i for i, e in enumerate(experiments) if any(e is k for k in kept)])
    for e, model in zip(experiments, models):
        config = model.configdict
        if "Imid" in config:
            # dials.scale records the intensity choice last (after the error model).
            config["Imid"] = config.pop("Imid")
        e.scaling_model = model.to_dict()
    # Scaling is done with the table: its in-memory columns go to a scratch file, so that
    # writing streams it from there.
    scaled.spill(list(scaled.keys()))
    # Each per-dataset table carries the whole identifier map; keep only the datasets that
    # were scaled, or the written .refl names an experiment the .expt lacks.
    kept_identifiers = {e.identifier for e in experiments}
    scaled.identifiers = {k: v for k, v in scaled.identifiers.items() if v in kept_identifiers}
    if local:
        scaled.output_order_key = output_order_key(experiments, scaled)
    return experiments, scaled, summary


# -- issue 11: the rank-local job (each rank its own rows) ------------------------------------
# dials.vmerge's output side (io/rank_local_refl.py, merging/rank_merge.py) takes the tables
# of a rank-local job (their rows and output_order_key); False: every configuration keeps the
# repeated path.
RANK_LOCAL_OUTPUT_READY = True
# The column that carries a rank's rows' one-process original_index from the partition to
# preparation (dropped there).
RANK_ORIGINAL_INDEX = "__rank_original_index"
# output_order_key = (position of the row's dataset in the scaled experiments) <<
# OUTPUT_ORDER_SHIFT | original_index (< 2^40 rows per dataset).
OUTPUT_ORDER_SHIFT = 40


# Each condition reads its parameter with model.base.param (a default where a caller's
# parameters lack the scope: library callers pass partial extracts).
def _merged_on_rank_rows(params):
    # the merge takes the rank's rows as they are only for the methods merged per rank
    # (rank_merge.RANK_METHODS: one method; variational too, its Sigma(d) fitted over the
    # ranks, merging/rank_variational.py)
    from .backends import mpi_world
    from .merging import rank_merge

    return rank_merge.applies(params, max(2, mpi_world.n_ranks()))


# scaling_options.use_free_set runs rank-local (session 11): a row's membership is a hash of
# its ASU index (scaling/free_set.py), decided by the rank that holds it, and the free count
# is a sum over ranks; outputs byte-identical at N = 1, 2, 3 (rotation and stills).
# scaling_options.reference too: the targeted sums go over the job's key blocks
# (scaling/targeted.py _grouped_sum), the small scale cutoff's mean is an exact sum.
# scaling_options.target=likelihood too: its sums over groups are key-block trees and its
# resolution bins order statistics over the gathered groups (scaling/likelihood.py).
# filtering.method=deltacchalf too (session 12): its cycles are ScalingCycles (every rank
# keeps its key range of the first cycle's partition, one process the same blocks); the
# ΔCC½ sums are passes over the unique reflections continued from rank to rank
# (scaling/delta_cc_half.py), the groups, image ranges, bins and counts reduced over ranks,
# the per-cycle statistics merging/rank_merge.py's; outputs byte-identical at N = 1, 2, 3
# (dataset mode on rotation and stills, image_group mode).
# Cross-validation too (session 12): its jobs are free-set jobs on the rank's rows,
# partitioned once for all folds and configurations (RankRows), and the work/free
# statistics are rank_merge.rank_merging_statistics of the ranks' rows
# (cross_validation.py); its table byte-identical at N = 1, 2, 3.
# anomalous=True too (issue 11, session 12): the scaling run's groups by the anomalous index
# are in (unique reflection, hand) order in every run (ih_table.GroupLayout.friedel_ordered),
# so a rank's groups are a contiguous run of the one-process groups and the sums over them go
# by the job's key blocks; group-level choices (selection, E^2 shells) still take the (h, k,
# l) order of the anomalous indices (backends/group_order.py).
# merging.method=variational too (session 12): its Sigma(d) EM takes the bins and per-bin sums
# over all ranks' groups (merging/rank_variational.py); outputs byte-identical at N = 1, 2, 3.
RANK_LOCAL_CONDITIONS = [
    _merged_on_rank_rows,
]


def rank_local_supported(params, n_datasets: int = 1) -> bool:
    """Whether a scaling job with these parameters (and experiments) runs rank-local under
    MPI (each rank its own rows; backends/rank_local.py). Others repeat every stage on every
    rank (README, "Running under MPI"). Each condition is one named function of
    RANK_LOCAL_CONDITIONS. (n_datasets: none depends on it since session 12, when the
    per-dataset Imid search of more than 64 datasets became rank-local.)"""
    return all(condition(params) for condition in RANK_LOCAL_CONDITIONS)


def rank_local_rows(experiments, table):
    """(partition, InputRowKeys or None, this rank's table) of a rank-local job: the
    read-time key partition of all rows (every rank maps every row's key, as
    read_time_keyed_partition), then this rank's rows in input order, lazy columns left in
    their file (table.select keeps them lazy, so the rank materialises only its rows). The
    rows carry their one-process original_index (position within the dataset in input
    order: rank_partition.positions_within_dataset) for preparation."""
    from .backends import mpi_world
    from .backends.rank_partition import keys_and_partition, positions_within_dataset
    from .geometry import space_group

    if not len(experiments):
        return None, None, table
    # the blocks of a one-process run of the same input (rows preparation keeps)
    keys, partition = keys_and_partition(table, space_group(experiments[0]),
                                         mpi_world.n_ranks())
    rows = partition.rows_of_rank(keys, mpi_world.rank())
    original_index = positions_within_dataset(table, rows).astype(np.uint64)
    own = table.select(rows)
    del table  # the input table (its `id` column read whole) is not kept
    row_keys = None
    # the file rows of own's lazy miller_index column: the row index its lazy columns share
    # (LazyColumn.select's memo), not a second copy (8 B per row of the rank)
    located = own.file_rows_of("miller_index", slice(None)) \
        if hasattr(own, "file_rows_of") else None
    if located is not None:
        # only this rank's rows' keys are looked up later (scaling's grouping): kept by
        # file row for its rows alone, not 8 B for every input row
        row_keys = _RankRowKeys(located[0], located[1], keys[rows])
    del keys
    own[RANK_ORIGINAL_INDEX] = original_index
    return partition, row_keys, own


def later_cycle_rank_rows(experiments, table):
    """A rank's rows of a scaled table given to a later job of ScalingCycles (the rank's
    rows of the job before, less removed datasets), with the one-process original_index of
    each for preparation (RANK_ORIGINAL_INDEX): one process numbers a dataset's rows of
    that table in its row order, which is output_order_key order (the rows are in the
    first job's output order), so a row's number is the count of the dataset's rows, on
    every rank, with a smaller key. Every rank gathers every row's key (8 B per row of the
    job, transient) for the count."""
    from .backends import rank_local

    key = output_order_key(experiments, table)
    everyone = np.sort(rank_local.gather_in_rank_order(key), kind="stable")
    dataset_start = (key >> OUTPUT_ORDER_SHIFT) << OUTPUT_ORDER_SHIFT
    table[RANK_ORIGINAL_INDEX] = (np.searchsorted(everyone, key)
                                  - np.searchsorted(everyone, dataset_start)).astype(np.uint64)
    return table


class _RankRowKeys:
    """rank_partition.InputRowKeys for a rank's own rows: their file rows (sorted) and keys,
    looked up by binary search; the same answers for those rows."""

    def __init__(self, column, file_rows, keys):
        self.column = column
        file_rows = np.asarray(file_rows)  # int32 or int64, as the lazy column holds them
        keys = np.asarray(keys, dtype=np.int64)
        if file_rows.size > 1 and np.any(file_rows[1:] < file_rows[:-1]):
            order = np.argsort(file_rows, kind="stable")
            file_rows, keys = file_rows[order], keys[order]
        # ascending (the rank's rows in input order of one file): the arrays as given, so
        # file_rows may be the lazy columns' own row index, shared, not copied
        self.file_rows, self.keys = file_rows, keys

    def release(self):
        self.file_rows = self.keys = None

    def asu_of(self, table, rows):
        from .backends.rank_partition import unpack_keys

        if self.keys is None:
            return None
        located = table.file_rows_of("miller_index", rows) if hasattr(table, "file_rows_of") \
            else None
        if located is None or not located[0]._same_blob(self.column):
            return None
        at = np.searchsorted(self.file_rows, located[1])
        at = np.minimum(at, max(self.file_rows.size - 1, 0))
        if located[1].size and (self.file_rows.size == 0
                                or np.any(self.file_rows[at] != located[1])):
            return None
        return unpack_keys(self.keys[at]).astype(np.int32)


def output_order_key(experiments, table):
    """int64 per row of a scaled table: (position of the row's dataset in `experiments`) <<
    OUTPUT_ORDER_SHIFT | original_index. One process orders scaled.refl dataset by dataset
    in experiment order, input order within a dataset (group_rows_by_dataset; a summed
    partial takes its first piece's place), so the ranks' keys merged in ascending order
    give that order; each rank's rows are ascending in it."""
    from .selection import dataset_position_of_rows

    position = dataset_position_of_rows(table, experiments)
    index = np.asarray(table.peek("original_index"), dtype=np.int64)
    if index.size and int(index.max()) >= (1 << OUTPUT_ORDER_SHIFT):
        raise VmergeError("a dataset with 2^40 rows or more")
    return (position.astype(np.int64) << OUTPUT_ORDER_SHIFT) | index


# On (session 7): every block sum of a scaling job, one process included, uses the input
# rows' key blocks, so N = 1, 2, 3 ranks use the same blocks. It became cheap enough once the
# block sums evaluate a batch of blocks (all of them, for a physical sweep) in one kernel call
# and scaling's grouping reuses the partition pass's ASU mapping: on the 1e6 sweep the block
# sums cost the same CPU on and off, the partition pass ~0.2 s and the grouping ~0.1 s less
# (README, "Running under MPI"). Off: blocks cut from each layout, as before session 7.
USE_READ_TIME_KEY_BLOCKS = True


def read_time_partition(experiments, table):
    """The input rows' partition into fixed key blocks and the MPI ranks' ranges of them
    (backends/rank_partition.py; one rank without a launcher)."""
    from .backends import mpi_world
    from .backends.rank_partition import partition_table
    from .geometry import space_group

    if not len(experiments):
        return None
    return partition_table(table, space_group(experiments[0]), mpi_world.n_ranks())


def read_time_keyed_partition(experiments, table):
    """(read_time_partition's partition, the rows' keys for preparation to reuse: its
    non-anomalous ASU mapping then costs nothing more; backends/rank_partition.py
    keyed_partition), or (None, None) without experiments."""
    from .backends import mpi_world
    from .backends.rank_partition import keyed_partition
    from .geometry import space_group

    if not len(experiments):
        return None, None
    return keyed_partition(table, space_group(experiments[0]), mpi_world.n_ranks())


def choose_compute_device(params, log) -> str:
    from .backends.select import choose_device

    device = choose_device(params.compute.device)
    if device == "cuda":
        from .backends.select import select_rank_device

        # under MPI, rank r on GPU r % (visible GPUs) (README, "GPU")
        select_rank_device()
        # issue 12: the per-observation passes run on the device (backends/run_device.py
        # logs which); the minimiser stays on the host.
        log.info("compute.device: a GPU is visible; scaling target and gradient use it for large jobs "
                 "(cuda: always)")
    return device


# Below this b the log prints b as 0.00000 and 1/(a b) is not a measured limit but the
# rounding of a vanishing b (1e-8 or exactly 0 after a last-bit change in the sums): say so
# instead of printing a number of 1e8 or more that changes with the last bits.
ISA_B_FLOOR = 5e-6


def isa_limit_text(a, b) -> str:
    """The log's "estimated I/sigma asymptotic limit" (1/(a b), dials-scaling.md)."""
    if abs(b) < ISA_B_FLOOR or a * b <= 0:
        return f"inf (b < {ISA_B_FLOOR:g})" if abs(b) < ISA_B_FLOOR else "inf"
    return f"{1.0 / (a * b):.3f}"


def format_scaling_summary(experiments, models, summary) -> str:
    from .dataset_summary import SUMMARY_ABOVE_DATASETS, format_many_datasets_summary

    if len(models) > SUMMARY_ABOVE_DATASETS:
        return format_many_datasets_summary(experiments, models, summary)
    lines = []
    kept = summary.get("experiments", experiments)
    per_dataset = summary.get("datasets", [])
    for n, (e, model) in enumerate(zip(kept, models)):
        lines.append(f"\nDataset {n} ({e.identifier}):")
        lines.append(str(model))
        info = per_dataset[n] if n < len(per_dataset) else {}
        if info.get("error_model"):
            a, b = info["error_model"]
            limit = isa_limit_text(a, b)
            lines.append("Error model details:")
            lines.append("  Type: basic")
            lines.append(f"  Parameters: a = {a:.5f}, b = {b:.5f}")
            lines.append("  Error model formula: sigma'^2 = a^2 (sigma^2 + (b I)^2)")
            lines.append(f"  estimated I/sigma asymptotic limit: {limit}")
        for key in ("n_suitable", "n_selected", "n_outliers"):
            if key in info:
                lines.append(f"  {key.replace('n_', 'reflections ', 1).replace('_', ' ')}: {info[key]}")
        if info.get("Imid") is not None:
            lines.append(f"  intensity choice (Imid): {info['Imid']}")
    for identifier in summary.get("dropped_datasets", []):
        lines.append(f"Dataset {identifier} was removed during scaling (no usable reflections)")
    return "\n".join(lines)


def write_scaled_files(params, experiments, table, log, staged=None) -> str:
    """Write scaled.expt and scaled.refl; returns the path the reflections were written to.

    staged (io.atomic.StagedOutputs): write under temporary names that become the real ones
    when the staging block succeeds."""
    refl_path = start_writing_scaled_files(params, experiments, table, staged).result()
    log_scaled_files_saved(params, log)
    return refl_path


def start_writing_scaled_files(params, experiments, table, staged=None):
    """write_scaled_files with scaled.refl written by a background thread (issue 10: it
    overlaps merging): scaled.expt is written now; the returned BackgroundTask's result() is
    the path the reflections were written to, or raises the writer's error. The table must
    not change until then (merging only reads it). The thread logs nothing: the caller
    logs (log_scaled_files_saved)."""
    from .background import BackgroundTask
    from .io import write_experiments, write_reflections

    if params.output.delete_integration_shoeboxes and "shoebox" in table:
        table.del_column("shoebox")
    expt_path, refl_path = params.output.experiments, params.output.reflections
    if staged is not None:
        expt_path, refl_path = staged.path_for(expt_path), staged.path_for(refl_path)
    write_experiments(experiments, expt_path)
    from .backends.rank_local import holds_own_rows

    if holds_own_rows(table):
        # issue 11, a rank-local job: each rank holds its own rows and rank 0 writes the file
        # from gathered windows (io/rank_local_refl.py), now, in this thread: the gathers are
        # collectives on COMM_WORLD, which merging's collectives must not overlap (MPI calls
        # from two threads would need MPI_THREAD_MULTIPLE, and their order would differ
        # between ranks)
        from .io.rank_local_refl import write_rank_local_reflections

        write_rank_local_reflections(table, refl_path)
        return FinishedTask(refl_path)

    def write():
        write_reflections(table, refl_path)
        return refl_path

    return BackgroundTask(write)


class FinishedTask:
    """A BackgroundTask's interface for work already done in line."""

    def __init__(self, value):
        self._value = value

    def wait(self) -> None:
        pass

    def result(self):
        return self._value


def log_scaled_files_saved(params, log) -> None:
    log.info(f"Saved scaled experiments to {params.output.experiments}")
    log.info(f"Saved scaled reflections to {params.output.reflections}")


def output_paths_collide_with_inputs(params, inputs) -> bool:
    outs = {os.path.abspath(p) for p in (params.output.experiments, params.output.reflections)}
    return any(os.path.abspath(p) in outs for p in inputs.paths)


def json_ready(obj):
    """Plain JSON types: numpy scalars/arrays to numbers/lists, experiments to identifiers."""
    # Plain numbers and strings first, by exact type (np.float64 is a float subclass and
    # keeps its path below): most of a report's ~1.6e4 values are list elements (issue 10).
    kind = type(obj)
    if kind is float:
        return obj if math.isfinite(obj) else None
    if kind is int or kind is str or kind is bool or obj is None:
        return obj
    from .io.expt import Experiment

    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, Experiment):
        return obj.identifier
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
