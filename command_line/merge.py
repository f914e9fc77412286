"""dials.vmerge.merge: merge scaled data (ours or dials.scale's) into merged.mtz."""

from dials_vmerge.cli import Program, write_json
from dials_vmerge.pipeline import check_usable_intensities
from dials_vmerge.merging.api import (
    apply_input_selection,
    log_statistics,
    merge_scaled_table,
    single_method,
    write_merge_outputs,
)

HELP = """\
dials.vmerge.merge scaled.expt scaled.refl [merging.method=classical|robust|variational] ...

Merges scaled observations (intensity.scale.value / inverse_scale_factor, rows flagged bad
for scaling dropped, partials combined) into unique reflections and writes merged.mtz with
the dials.merge columns (IMEAN, I(+/-), F, F(+/-), DANO, N, FreeR_flag), the merging
statistics by resolution shell and overall in the log and dials.vmerge.merge.json.

Examples:
  dials.vmerge.merge scaled.expt scaled.refl
  dials.vmerge.merge scaled.expt scaled.refl merging.method=variational
  dials.vmerge.merge scaled.expt scaled.refl method=robust robust.dof=8 unmerged_mtz=unmerged.mtz
"""


def run(params, inputs, log):
    check_usable_intensities(inputs.reflections, ", ".join(inputs.reflection_paths))
    experiments, table = apply_input_selection(params, inputs.experiments, inputs.reflections, log)
    method = single_method(params)
    log.info(f"Merging with method={method}")
    result = merge_scaled_table(table, experiments, params, log)
    log.info(f"{len(result.observations)} observations merged into {len(result.merged)} "
             "unique reflections")
    log_statistics(result, log)
    write_merge_outputs(result, params, log, program="dials.vmerge.merge")
    write_json(params.output.json or "dials.vmerge.merge.json", result.as_dict())


main = Program(
    name="dials.vmerge.merge",
    phil_files=["input", "merging", "compute", "output"],
    run=run,
    help=HELP,
    needs_data=True,
).main
