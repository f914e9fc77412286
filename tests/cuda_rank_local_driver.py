"""Test driver (tests/test_mpi_rank_local_cuda.py): the whole dials.vmerge program with
compute.device=cuda on numba's CUDA simulator, run as one process or under mpiexec.

    [mpiexec -n N] python cuda_rank_local_driver.py [block_observations] dials.vmerge-args...

The simulator runs one Python thread per CUDA thread, so the tests' data are a few thousand
observations; the job's key blocks (block_sums.MIN_BLOCK_OBSERVATIONS, 4096 in a run) are
made smaller here (block_observations) so that such data still has several blocks and the
ranks several rows each. Everything else is the installed program.
"""

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import dials_vmerge  # noqa: E402,F401  (before numba/scipy.special)
from dials_vmerge.backends import block_sums  # noqa: E402

if __name__ == "__main__":
    block_sums.MIN_BLOCK_OBSERVATIONS = int(sys.argv[1])
    from dials_vmerge.command_line.vmerge import main  # noqa: E402

    sys.argv = ["dials.vmerge"] + sys.argv[2:]
    sys.exit(main())
