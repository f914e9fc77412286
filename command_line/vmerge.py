"""dials.vmerge: scale and merge DIALS integrated (or already scaled) data."""

import json

from dials_vmerge.cli import Program, write_json
from dials_vmerge.merging.api import log_statistics, merge_scaled_table, write_merge_outputs
from dials_vmerge.pipeline import json_ready, run_scaling_job, write_scaled_files

HELP = """\
dials.vmerge integrated.expt integrated.refl [more.expt more.refl ...] [name=value ...]

Scales with the DIALS physical, array or KB model (model=auto chooses as dials.scale does),
refines an error model, rejects outliers, and merges. Writes scaled.expt, scaled.refl,
merged.mtz, dials.vmerge.log and dials.vmerge.json.

Examples:
  dials.vmerge integrated.expt integrated.refl
  dials.vmerge scaled.expt scaled.refl exclude_batches=1901,1950 nproc=8
  dials.vmerge sweep1.expt sweep1.refl sweep2.expt sweep2.refl model=physical absorption_level=medium
"""


def run(params, inputs, log):
    experiments, table, summary = run_scaling_job(params, inputs.experiments, inputs.reflections, log)
    merged = merge_scaled_table(table, experiments, params, log)
    log_statistics(merged, log)
    report = json_ready({"scaling": summary, "merging": merged.as_json()})
    json.dumps(report)  # fail before any file is written if the report cannot be saved
    # Every result is computed; now write, each file atomically.
    write_scaled_files(params, experiments, table, log)
    write_merge_outputs(merged, params, log)
    write_json(params.output.json or "dials.vmerge.json", report)


main = Program(
    name="dials.vmerge",
    phil_files=["input", "model", "scaling", "merging", "compute", "output"],
    run=run,
    help=HELP,
).main
