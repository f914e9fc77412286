"""dials.vmerge.show: what is in these .expt/.refl (or .expt alone, or .mtz) files."""

from dials_vmerge.cli import Program
from dials_vmerge.show import summarise, summarise_mtz

HELP = """\
dials.vmerge.show integrated.expt integrated.refl [more.expt more.refl ...]
dials.vmerge.show scaled.expt
dials.vmerge.show merged.mtz unmerged.mtz

Per experiment: identifier, image and batch ranges, valid image ranges (after exclusions),
oscillation, space group, unit cell, number of reflections, flags summary, intensity columns
and scaling model; for several files the combined batch table; then totals. An .expt alone
shows the experiments; an .mtz (merged or unmerged) its symmetry, cell, datasets, columns
with their ranges, batches and totals.

Examples:
  dials.vmerge.show scaled.expt scaled.refl
  dials.vmerge.show scaled.expt
  dials.vmerge.show merged.mtz
"""


def run(params, inputs, log):
    for path in inputs.mtz_paths:
        log.info(summarise_mtz(path))
    if inputs.experiments is not None:
        log.info(summarise(inputs.experiments, inputs.reflections))


main = Program(name="dials.vmerge.show", phil_files=[], run=run, help=HELP, write_log=False,
               accepts_mtz=True, experiments_alone=True).main
