"""dials.vmerge.stats: merging statistics and half-dataset cross-validation, per method."""

from dials_vmerge.cli import Program, write_json
from dials_vmerge.io.atomic import StagedOutputs
from dials_vmerge.report import stage_report
from dials_vmerge.pipeline import check_usable_intensities
from dials_vmerge.merging.api import (
    apply_input_selection,
    log_statistics,
    selected_methods,
    summary_table,
)
from dials_vmerge.merging import rank_merge
from dials_vmerge.merging.diagnostics import method_differences
from dials_vmerge.merging.halfdataset import format_half_dataset_table

HELP = """\
dials.vmerge.stats scaled.expt scaled.refl [merging.method=all] [half_dataset_repeats=10] ...

Merging statistics by resolution shell (equal-volume shells, nbins) and overall, with the
definitions of iotbx.merging_statistics (Rmerge, Rmeas, Rpim, Ranom, CC1/2, CCanom), the
CC1/2 resolution estimate, and cross-validation by repeated random half-dataset splits by
batch: CC1/2 and CCanom (Pearson and Spearman, mean and SD over the repeats) for each chosen
merging method, side by side (merging.method=classical+variational, or all).

Examples:
  dials.vmerge.stats scaled.expt scaled.refl
  dials.vmerge.stats scaled.expt scaled.refl merging.method=all half_dataset_repeats=20
"""


def run(params, inputs, log):
    check_usable_intensities(inputs.reflections, ", ".join(inputs.reflection_paths))
    experiments, table = apply_input_selection(params, inputs.experiments, inputs.reflections, log)
    methods = selected_methods(params)
    # under MPI: each method's merge, statistics and half-dataset cross-validation on each
    # rank's own rows (issue 11) when rank_merge.applies to it (merging.method is set to that
    # one method below); method_differences compares the merges gathered on rank 0
    merge = rank_merge.merge_scaled_table
    report = {"methods": methods, "half_dataset": {}}
    first = None
    for method in methods:
        params.merging.method = [method]
        repeats = params.merging.half_dataset_repeats
        result = merge(table, experiments, params, log, half_dataset=repeats > 0)
        if first is None:
            first = result
            log.info(f"{result.n_observations()} observations, {len(result.merged)} unique "
                     "reflections")
            log_statistics(result, log)
            if result.statistics is not None:
                report["merging_statistics"] = result.statistics.as_dict()
                report["summary_table"] = summary_table(result.statistics)
            report["method"] = method
            report["per_batch"] = result.per_batch
            report["diagnostics"] = result.diagnostics
        if result.half_dataset is not None:
            report["half_dataset"][method] = result.half_dataset
        if result is not first:
            report.setdefault("method_differences", {})[method] = method_differences(first,
                                                                                  result)
    params.merging.method = methods
    if report["half_dataset"]:
        log.info("")
        log.info(format_half_dataset_table(report["half_dataset"]))
    with StagedOutputs() as staged:
        write_json(params.output.json or "dials.vmerge.stats.json", report)
        stage_report(report, params, staged, "dials.vmerge.stats", log)


main = Program(
    name="dials.vmerge.stats",
    phil_files=["input", "merging", "compute", "output"],
    run=run,
    help=HELP,
    needs_data=True,
).main
