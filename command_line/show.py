"""dials.vmerge.show: what is in these .expt/.refl files."""

from dials_vmerge.cli import Program
from dials_vmerge.show import summarise

HELP = """\
dials.vmerge.show integrated.expt integrated.refl [more.expt more.refl ...]

Per experiment: identifier, image and batch ranges, oscillation, space group, unit cell,
number of reflections, flags summary, intensity columns and scaling model; for several
files the combined batch table.
"""


def run(params, inputs, log):
    log.info(summarise(inputs.experiments, inputs.reflections))


main = Program(name="dials.vmerge.show", phil_files=[], run=run, help=HELP, write_log=False).main
