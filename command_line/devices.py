"""dials.vmerge.devices: which compute backends are usable on this machine."""

from dials_vmerge.cli import Program
from dials_vmerge.devices import format_report, report

HELP = """\
dials.vmerge.devices

CPU cores, numba version and threading layer, whether numba's CUDA target sees a GPU (and
whether the CUDA simulator is on), whether mpi4py and an MPI launcher are usable.
"""


def run(params, inputs, log):
    log.info(format_report(report()))


main = Program(
    name="dials.vmerge.devices", phil_files=[], run=run, help=HELP, needs_data=False, write_log=False
).main
