"""dials.vmerge.merge: merge scaled data (ours or dials.scale's) into merged.mtz."""

from dials_vmerge.backends.mpi_world import is_output_rank
from dials_vmerge.cli import Program, write_json
from dials_vmerge.io.atomic import StagedOutputs
from dials_vmerge.model.curves import model_curves
from dials_vmerge.report import stage_report
from dials_vmerge.pipeline import check_usable_intensities
from dials_vmerge.progress import run_progress, stage
from dials_vmerge.unit_cells import check_unit_cells_of_table
# under MPI: each rank merges the rows of its own unique reflections (issue 11)
from dials_vmerge.merging.rank_merge import merge_scaled_table
from dials_vmerge.merging.api import (
    apply_input_selection,
    log_statistics,
    single_method,
    write_merge_outputs,
)

HELP = """\
dials.vmerge.merge scaled.expt scaled.refl [merging.method=classical|robust|variational] ...

Merges scaled observations (intensity.scale.value / inverse_scale_factor, rows flagged bad
for scaling dropped, partials combined) into unique reflections and writes merged.mtz with
the dials.merge columns (IMEAN, I(+/-), F, F(+/-), DANO, N, FreeR_flag), the merging
statistics by resolution shell and overall in the log and dials.vmerge.merge.json.

An unmerged MTZ (ours, dials.export's, AIMLESS's, or XDS/XSCALE's via POINTLESS) can be
given instead of .expt/.refl: its I/SIGI are merged as they stand.

Examples:
  dials.vmerge.merge scaled.expt scaled.refl
  dials.vmerge.merge unmerged.mtz merging.method=robust
  dials.vmerge.merge scaled.expt scaled.refl merging.method=variational
  dials.vmerge.merge scaled.expt scaled.refl method=robust robust.dof=8 unmerged_mtz=unmerged.mtz
"""


def run(params, inputs, log):
    method = single_method(params)
    experiments = table = None
    if inputs.mtz_paths:
        result = _merge_mtz(params, inputs.mtz_paths, method, log)
    else:
        check_usable_intensities(inputs.reflections, ", ".join(inputs.reflection_paths))
        experiments, table = apply_input_selection(params, inputs.experiments,
                                                   inputs.reflections, log)
        check_unit_cells_of_table(experiments, table, log, params.allow_inconsistent_cells)
        log.info(f"Merging with method={method}")
    with run_progress(log, 3):
        if table is not None:
            with stage(log, "Merging"):
                result = merge_scaled_table(table, experiments, params, log)
        log.info(f"{result.n_observations()} observations merged into {len(result.merged)} "
                 "unique reflections")
        with stage(log, "Merging statistics"):
            log_statistics(result, log)
        with stage(log, "Writing merged files"):
            write_merge_outputs(result, params, log, program="dials.vmerge.merge")
            report = result.as_dict()
            # under MPI the other ranks' reports are never published: only rank 0 reads
            # the table's columns for the model curves
            if table is not None and is_output_rank():
                report["scaling_models"] = model_curves(experiments, table)
            with StagedOutputs() as staged:
                write_json(params.output.json or "dials.vmerge.merge.json", report)
                stage_report(report, params, staged, "dials.vmerge.merge", log)


def _merge_mtz(params, paths, method, log):
    """An unmerged MTZ (ours, dials.export's, AIMLESS's or XSCALE's via POINTLESS), merged as
    its I/SIGI stand; dataset/image/batch selections need .expt/.refl input."""
    from dials_vmerge.errors import VmergeError
    from dials_vmerge.merging.api import merge_unmerged_mtz
    from dials_vmerge.mtz import read_unmerged_mtz

    if len(paths) > 1:
        raise VmergeError("one unmerged .mtz file at a time (combine them with POINTLESS)")
    selection = params.dataset_selection
    if (params.exclude_images or params.exclude_batches or selection.use_datasets
            or selection.exclude_datasets):
        raise VmergeError(f"{paths[0]}: exclude_images, exclude_batches and dataset "
                          "selection need .expt/.refl input")
    unmerged = read_unmerged_mtz(paths[0])
    log.info(f"Read {len(unmerged.intensity)} observations in {unmerged.n_batches} batches "
             f"from {paths[0]} (space group {unmerged.space_group.info()})")
    log.info(f"Merging with method={method}")
    return merge_unmerged_mtz(unmerged, params, log)


main = Program(
    name="dials.vmerge.merge",
    phil_files=["input", "merging", "compute", "output"],
    run=run,
    help=HELP,
    needs_data=True,
    accepts_mtz=True,
).main
