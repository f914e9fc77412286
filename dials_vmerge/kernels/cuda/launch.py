"""Launch geometry and the group sums shared by the CUDA kernels.

THREADS_PER_BLOCK is a power of two (the shared-memory reductions halve it). The CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) runs one Python thread per CUDA thread, at ~0.3 ms each,
and starting a thread costs more than most kernels' work per item: there a launch is one block
of 8 threads, each looping over many items (every kernel is a grid-stride loop; 8 still makes
a three-level reduction tree, and a job's hundreds of launches took 1.5x as long with 32).
That changes the launch shape and the order of the per-block Phi tree, not the results beyond
rounding.
"""

from __future__ import annotations

import os

from numba import cuda

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
THREADS_PER_BLOCK = 8 if SIMULATOR else 128
# Every kernel loops over its items with a grid stride, so any grid covers them; the
# simulator gets one block (thread start-up dominates its cost), a GPU one thread per item.
MAX_BLOCKS = 1 if SIMULATOR else 2 ** 31 - 1


def as_device(array, dtype):
    """array itself when it is already on the device (a resident column of the job table,
    backends.cuda_job_table), else its copy there."""
    import numpy as np

    if hasattr(array, "copy_to_host"):  # a device array (the simulator has no is_cuda_array)
        return array
    return cuda.to_device(np.ascontiguousarray(array, dtype=dtype))


def blocks(n_threads):
    """Blocks of a launch over n_threads items."""
    return min(MAX_BLOCKS, max(1, (int(n_threads) + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK))


@cuda.jit(device=True)
def group_weighted_sums(intensity, weight, g, lo, hi):
    """(sum w g I, sum w g^2) over one group's rows: Ih = the first / the second (device twin
    of scaling.ih_table.group_weighted_sums)."""
    s_wgi = 0.0
    s_wgg = 0.0
    for i in range(lo, hi):
        wg = weight[i] * g[i]
        s_wgi += wg * intensity[i]
        s_wgg += wg * g[i]
    return s_wgi, s_wgg
