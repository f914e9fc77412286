"""dials-vmerge: scaling and merging of diffraction data, reading and writing DIALS files."""

import os as _os

# cctbx-base ships its own OpenMP runtime (libomptbx); with numba's "omp" threading layer in
# the same process, prange reductions return wrong sums (seen: 200 for a sum of 100 ones).
# The workqueue layer has no OpenMP and is correct. It must be chosen before numba starts
# its thread pool, so it is fixed here, at the first import of the package.
_os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

# boost.python extensions of cctbx segfault on import if scipy.special or numba were
# imported first in the process; importing them here first makes every import order safe.
try:
    import cctbx.sgtbx  # noqa: E402,F401
    import cctbx.miller  # noqa: E402,F401
except ImportError:  # the kernel layer (dials_vmerge.kernels) runs with numpy and numba alone
    pass

import numba as _numba  # noqa: E402

_numba.config.THREADING_LAYER = "workqueue"

__version__ = "0.1.0"
