"""dials.vmerge: scale and merge DIALS integrated (or already scaled) data."""

import json

from dials_vmerge.cli import Program, write_json
from dials_vmerge.io import read_reflections
from dials_vmerge.io.atomic import StagedOutputs
from dials_vmerge.memory import release_free_memory
from dials_vmerge.merging.api import log_statistics, merge_scaled_table, write_merge_outputs
from dials_vmerge.pipeline import json_ready, run_scaling_job, write_scaled_files

HELP = """\
dials.vmerge integrated.expt integrated.refl [more.expt more.refl ...] [name=value ...]

Scales with the DIALS physical, array or KB model (model=auto chooses as dials.scale does),
refines an error model, rejects outliers, and merges. Writes scaled.expt, scaled.refl,
merged.mtz, dials.vmerge.log and dials.vmerge.json.

A rerun on scaled.expt/scaled.refl (ours or dials.scale's) repeats the scaling on the same
prepared observations and reproduces the previous result; new exclusions act on top.
output.unmerged_mtz= also writes the unmerged MTZ (as dials.scale).

Examples:
  dials.vmerge integrated.expt integrated.refl
  dials.vmerge scaled.expt scaled.refl exclude_batches=41,50 nproc=8
  dials.vmerge sweep1.expt sweep1.refl sweep2.expt sweep2.refl model=physical absorption_level=medium
  dials.vmerge integrated.expt integrated.refl output.unmerged_mtz=unmerged.mtz
"""


def run(params, inputs, log):
    # The job consumes the input table (its columns move into the scaled one): drop our
    # reference so that nothing keeps it alive.
    table, inputs.reflections = inputs.reflections, None
    experiments, table, summary = run_scaling_job(params, inputs.experiments, table, log)
    with StagedOutputs() as staged:
        # The scaled files are written first, under temporary names that become scaled.expt
        # and scaled.refl only when everything below has succeeded. Merging then reads the
        # few columns it needs back from the written file instead of keeping the whole scaled
        # table in memory (the largest stage of a run otherwise).
        scaled_refl = write_scaled_files(params, experiments, table, log, staged)
        del table
        release_free_memory()
        merged = merge_scaled_table(read_reflections(scaled_refl), experiments, params, log)
        log_statistics(merged, log)
        report = json_ready({"scaling": summary, "merging": merged.as_json()})
        json.dumps(report)  # fail before any file is written if the report cannot be saved
        write_merge_outputs(merged, params, log)
        write_json(params.output.json or "dials.vmerge.json", report)


main = Program(
    name="dials.vmerge",
    phil_files=["input", "model", "scaling", "merging", "compute", "output"],
    run=run,
    help=HELP,
).main
