"""Which kernel backend a run uses: `compute.device = auto | cpu | cuda`."""

from __future__ import annotations

from dials_vmerge.errors import PhilError, VmergeError

DEVICES = ("auto", "cpu", "cuda")


def _cuda_driver_loadable() -> bool:
    """False when numba's CUDA driver search would certainly fail: no simulator, no
    NUMBA_CUDA_DRIVER, and none of the names and paths numba tries (numba/cuda/cudadrv/
    driver.py, locate_driver_and_loader) opens. Importing numba.cuda to learn that costs
    ~6 MB of resident memory for the rest of a CPU run (issue 10, memory)."""
    import ctypes
    import os
    import sys

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0" or os.environ.get("NUMBA_CUDA_DRIVER"):
        return True  # numba decides
    if sys.platform == "win32":
        return True
    names = ["libcuda.dylib"] if sys.platform == "darwin" else ["libcuda.so", "libcuda.so.1"]
    folders = ["/usr/local/cuda/lib"] if sys.platform == "darwin" else ["/usr/lib", "/usr/lib64"]
    for candidate in names + [os.path.join(f, n) for f in folders for n in names]:
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return True
    return False


def cuda_available() -> bool:
    """True if numba sees a usable GPU (or the simulator, NUMBA_ENABLE_CUDASIM=1)."""
    if not _cuda_driver_loadable():
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # a broken CUDA driver/toolkit means "no GPU", not a crash
        return False


def choose_device(requested: str) -> str:
    """'cpu' or 'cuda' for the requested compute.device (auto: cuda when a GPU is visible)."""
    device = str(requested).strip().lower()
    if device not in DEVICES:
        raise PhilError(f"compute.device={requested}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    available = cuda_available()
    if device == "cuda" and not available:
        raise VmergeError("compute.device=cuda: no GPU visible to numba (see dials.vmerge.devices)")
    return "cuda" if available else "cpu"


def rank_device_index(rank: int, n_devices: int) -> int:
    """The GPU an MPI rank uses (issue 11): rank r takes device r % n_devices of those
    numba sees (CUDA_VISIBLE_DEVICES applies first), so ranks share GPUs round-robin when
    there are more ranks than GPUs on a host. Ranks are numbered over all hosts: with
    a launcher that packs ranks host by host and as many ranks per host as GPUs (or a
    multiple), each host's ranks cover its GPUs evenly."""
    return int(rank) % max(int(n_devices), 1)


def select_rank_device():
    """Make this MPI rank's GPU (rank_device_index) numba's current device, before the run
    creates a CUDA context; returns its index (0 in one process or with one visible
    device, or under the simulator, which has a single device)."""
    import os

    from . import mpi_world

    if mpi_world.n_ranks() == 1 or os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1":
        return 0
    from numba import cuda

    n_devices = len(cuda.gpus)
    index = rank_device_index(mpi_world.rank(), n_devices)
    if n_devices > 1:
        cuda.select_device(index)
    return index
