"""Which kernel backend a run uses: `compute.device = auto | cpu | cuda`."""

from __future__ import annotations

from dials_vmerge.errors import PhilError, VmergeError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """True if numba sees a usable GPU (or the simulator, NUMBA_ENABLE_CUDASIM=1)."""
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
