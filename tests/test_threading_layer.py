"""cctbx's OpenMP runtime breaks numba's omp layer; the package must select a safe one."""

import numpy as np

import dials_vmerge  # noqa: F401
import cctbx.miller  # noqa: F401
import iotbx.mtz  # noqa: F401
import numba
from numba import njit, prange


@njit(parallel=True)
def _parallel_sum(x):
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


def test_prange_reduction_is_correct_after_cctbx_import():
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for n in (100, 1000, 12345):
        assert _parallel_sum(np.ones(n)) == float(n)
    assert numba.threading_layer() == "workqueue"
