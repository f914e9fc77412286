"""dials-vmerge: scaling and merging of diffraction data, reading and writing DIALS files."""

import os as _os

# cctbx-base ships its own OpenMP runtime (libomptbx); with numba's "omp" threading layer in
# the same process, prange reductions return wrong sums (seen: 200 for a sum of 100 ones).
# The workqueue layer has no OpenMP and is correct. It must be chosen before numba starts
# its thread pool, so it is fixed here, at the first import of the package.
_os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

# One BLAS thread (numpy's and scipy's OpenBLAS read this when they load, i.e. only if the
# package is imported before numpy, as the programs do; a value already set wins): the
# engine's BLAS calls are dot products and small matrices, where OpenBLAS's threads gain
# nothing and, spinning beside numba's workers, cost a lot: on the 2-core machine at load 4,
# np.dot of 1.5e5 doubles took 15 ms with its threads against 0.04 ms without, and
# dials.vmerge on a 1e6 sweep used ~0.9 s less CPU (issue 10). Outputs bit-identical there.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# boost.python extensions of cctbx segfault on import if scipy.special or numba were
# imported first in the process; importing them here first makes every import order safe.
try:
    import cctbx.sgtbx  # noqa: E402,F401
    import cctbx.miller  # noqa: E402,F401
except ImportError:  # the kernel layer (dials_vmerge.kernels) runs with numpy and numba alone
    pass



def _default_numba_cache_dir() -> str:
    """Where compiled kernels are kept unless NUMBA_CACHE_DIR says otherwise: one place per
    installation, so that `make demo`, the installed programs and the tests all reuse one
    another's kernels (numba's own default, __pycache__ beside each source, differs from the
    Makefile's and is not writable in a system install). <prefix>/numba_cache for a
    writable environment (a virtualenv: .venv/numba_cache, as the Makefile sets), else
    ~/.cache/dials-vmerge/numba."""
    import sys

    if _os.access(sys.prefix, _os.W_OK):
        return _os.path.join(sys.prefix, "numba_cache")
    cache_home = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(
        _os.path.expanduser("~"), ".cache")
    return _os.path.join(cache_home, "dials-vmerge", "numba")


# Read by numba when it is first imported (just below).
_os.environ.setdefault("NUMBA_CACHE_DIR", _default_numba_cache_dir())

import numba as _numba  # noqa: E402

_numba.config.THREADING_LAYER = "workqueue"

__version__ = "0.1.0"
