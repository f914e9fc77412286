"""dials.vmerge.merge (placeholder until its issue lands)."""

from dials_vmerge.cli import Program

main = Program(name="dials.vmerge.merge", phil_files=[], run=None, needs_data=False, implemented=False, write_log=False).main
