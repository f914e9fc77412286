"""dials.vmerge: scale and merge DIALS integrated (or already scaled) data."""

import json

from dials_vmerge.cli import Program, write_json
from dials_vmerge.io import read_reflections
from dials_vmerge.io.atomic import StagedOutputs
from dials_vmerge.memory import release_free_memory
from dials_vmerge.merging.api import log_statistics, write_merge_outputs
# under MPI: each rank merges the rows of its own unique reflections (issue 11)
from dials_vmerge.merging.rank_merge import merge_scaled_table
from dials_vmerge.pipeline import (json_ready, log_scaled_files_saved, run_scaling_job,
                                   start_writing_scaled_files)
from dials_vmerge.progress import run_progress, stage
from dials_vmerge.backends.rank_local import holds_own_rows
from dials_vmerge.model.curves import model_curves, scaled_z_extremes_over_ranks
from dials_vmerge.report import stage_report

HELP = """\
dials.vmerge integrated.expt integrated.refl [more.expt more.refl ...] [name=value ...]

Scales with the DIALS physical, array or KB model (model=auto chooses as dials.scale does),
refines an error model, rejects outliers, and merges. Writes scaled.expt, scaled.refl,
merged.mtz, dials.vmerge.log, dials.vmerge.json and the report dials.vmerge.html
(output.html=None: no report).

A rerun on scaled.expt/scaled.refl (ours or dials.scale's) repeats the scaling on the same
prepared observations and reproduces the previous result; new exclusions act on top.
output.unmerged_mtz= also writes the unmerged MTZ (as dials.scale).

Examples:
  dials.vmerge integrated.expt integrated.refl
  dials.vmerge scaled.expt scaled.refl exclude_batches=41,50 nproc=8
  dials.vmerge sweep1.expt sweep1.refl sweep2.expt sweep2.refl model=physical absorption_level=medium
  dials.vmerge integrated.expt integrated.refl output.unmerged_mtz=unmerged.mtz
"""


PHIL_FILES = ["input", "model", "scaling", "merging", "compute", "output", "cross_validation"]


def run(params, inputs, log):
    if params.cross_validation.cross_validation_mode:
        # dials.scale's cross-validation: a results table, no output files
        import iotbx.phil

        from dials_vmerge.cli import load_phil_text
        from dials_vmerge.cross_validation import run_cross_validation

        # the input goes in a holder, its only reference: under MPI each rank keeps only
        # its own rows (issue 11)
        reflections, inputs.reflections = [inputs.reflections], None
        run_cross_validation(params, inputs.experiments, reflections, log,
                             iotbx.phil.parse(load_phil_text(PHIL_FILES)))
        return
    with run_progress(log, N_STAGES):
        _run(params, inputs, log)


# the stages marked below and in pipeline.run_scaling_job (for the terminal's progress bar)
N_STAGES = 7


def _run(params, inputs, log):
    # The job consumes the input table (its columns move into the scaled one): no local of
    # this frame refers to it while the job runs (the call takes the holder's only
    # reference), so nothing keeps it alive. A rank-local job keeps only its own rows; the
    # input table, with the `id` column every rank reads whole, is then freed (issue 11:
    # 4 B per input row on every rank, 48 MiB for 20 000 stills).
    reflections, inputs.reflections = [inputs.reflections], None
    if params.filtering.method == "deltacchalf":
        from dials_vmerge.scaling.filtering import scale_and_filter

        experiments, table, summary = scale_and_filter(params, inputs.experiments,
                                                       reflections.pop(), log,
                                                       scale=run_scaling_job)
    else:
        experiments, table, summary = run_scaling_job(params, inputs.experiments,
                                                      reflections.pop(), log)
    # issue 11: a rank-local job returned this rank's rows only (backends/rank_local.py);
    # writing, merging and the report then gather from every rank (collectives, entered by
    # every rank in the same order)
    rank_local = holds_own_rows(table)
    with StagedOutputs() as staged:
        # The scaled files are written first, under temporary names that become scaled.expt
        # and scaled.refl only when everything below has succeeded. The table's columns are
        # file-backed (scratch file, input file), so merging reads the few it needs from
        # there while scaled.refl is written by a background thread (issue 10); in a
        # rank-local job it is written first, in line (its gathers are collectives).
        with stage(log, "Writing scaled files"):
            writing = start_writing_scaled_files(params, experiments, table, staged)
            log_scaled_files_saved(params, log)
        try:
            release_free_memory()
            with stage(log, "Merging"):
                merged = merge_scaled_table(table, experiments, params, log)
            with stage(log, "Merging statistics"):
                log_statistics(merged, log)
        except BaseException:
            writing.wait()  # the file is complete (or failed) before the staging removes it
            raise
        scaled_refl = writing.result()  # the writer's error, if any, is raised here
        z_extremes = None
        if rank_local:
            # no rank holds the file's rows: the report's z ranges from every rank's own
            z_extremes = scaled_z_extremes_over_ranks(table, experiments)
        del table
        from dials_vmerge.backends.run_device import device_transfer_report

        device_transfers = device_transfer_report(log.info)  # compute.device=cuda (issue 12)
        # Between the output steps the heaps' free pages go back to the OS: merging (and the
        # writer's buffers), the model curves and the MTZ leave freed arrays in the heaps
        # whose pages otherwise stay in RSS under the next step's (issue 10, memory: ~40 MB on
        # a 1e6 sweep, which put these steps, the free flags' cctbx arrays among them, at the
        # run's peak).
        release_free_memory(collect_cycles=False)
        with stage(log, "Writing merged files"):
            curves = (model_curves(experiments, extremes=z_extremes) if rank_local
                      else model_curves(experiments, read_reflections(scaled_refl)))
            report = json_ready({"scaling": summary, "merging": merged.as_json(),
                                 "scaling_models": curves, **device_transfers})
            json.dumps(report)  # fail before any file is written if the report cannot be saved
            release_free_memory(collect_cycles=False)
            write_merge_outputs(merged, params, log)
            write_json(params.output.json or "dials.vmerge.json", report)
            if "filtering" in summary:
                from dials_vmerge.scaling.filtering import write_filter_results

                write_filter_results(params, summary)
            release_free_memory(collect_cycles=False)
            stage_report(report, params, staged, "dials.vmerge", log)


main = Program(
    name="dials.vmerge",
    phil_files=PHIL_FILES,
    run=run,
    help=HELP,
).main
