"""Which compute backends are usable here: CPU threads, numba, CUDA, MPI."""

from __future__ import annotations

import os
import shutil
import sys


def cpu_report() -> dict:
    import numba

    return {
        "cpu_cores": os.cpu_count(),
        "numba_version": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "threading_layer": numba.config.THREADING_LAYER,
    }


def cuda_report() -> dict:
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
    try:
        from numba import cuda

        available = bool(cuda.is_available())
        devices = []
        if available and simulator:  # the simulator has no device list
            devices.append("numba CUDA simulator")
        elif available:
            for dev in cuda.list_devices():
                devices.append(dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name))
        reason = "" if available else "no CUDA driver or GPU visible to numba"
    except Exception as e:  # the CUDA target is optional
        available, devices, reason = False, [], f"numba.cuda unusable ({type(e).__name__})"
    out = {"cuda_available": available, "cuda_devices": devices, "cuda_simulator": simulator, "cuda_note": reason}
    out.update(cuda_kernel_report(available))  # issue 12
    return out


def cuda_kernel_report(available: bool) -> dict:
    """GPU memory, the numba-cuda version and whether the engine's CUDA kernels compile and
    give the CPU kernel's answer on a tiny input."""
    out = {"cuda_memory_gib": None, "numba_cuda_version": None, "cuda_kernels": "not tried (no GPU)"}
    try:
        from importlib.metadata import version

        out["numba_cuda_version"] = version("numba-cuda")
    except Exception:
        pass
    if not available:
        return out
    try:
        import numpy as np
        from numba import cuda

        try:
            free, total = cuda.current_context().get_memory_info()
            if np.isfinite(total):
                out["cuda_memory_gib"] = round(total / 2**30, 1)
                out["cuda_memory_free_gib"] = round(free / 2**30, 1)
        except Exception:
            pass
        from .kernels.cuda import models
        from .kernels.kb_family import evaluate_kb_family_g

        row = np.array([0, 1, 1], dtype=np.int64)
        s2 = np.array([0.05, 0.1, 0.2])
        k, b = np.array([1.5, 0.5]), np.array([-2.0, 1.0])
        g = cuda.device_array(3)
        models.kb_family_g_kernel[1, models.THREADS_PER_BLOCK](
            cuda.to_device(row), cuda.to_device(s2), cuda.to_device(np.ones(1)), False,
            cuda.to_device(k), cuda.to_device(b), g)
        same = np.allclose(g.copy_to_host(), evaluate_kb_family_g(row, s2, None, k, b), rtol=1e-12, atol=0)
        out["cuda_kernels"] = "compile and agree with the CPU" if same else "compile but DISAGREE with the CPU"
    except Exception as e:
        out["cuda_kernels"] = f"do not compile ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return out


def mpi_report() -> dict:
    try:
        import mpi4py  # noqa: F401

        have_mpi4py = True
        version = getattr(mpi4py, "__version__", "?")
    except ImportError:
        have_mpi4py, version = False, None
    # the `mpi` extra's mpich installs mpiexec beside the interpreter, maybe not on PATH
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    launcher = next((shutil.which(n, path=search) for n in ("mpiexec", "mpirun")
                     if shutil.which(n, path=search)), None)
    out = {"mpi4py": have_mpi4py, "mpi4py_version": version, "mpi_launcher": launcher}
    if have_mpi4py:
        from .backends.mpi_world import report as mpi_world_report

        out.update(mpi_world_report())  # library, ranks and hosts of this run
    return out


def report() -> dict:
    out = {}
    out.update(cpu_report())
    out.update(cuda_report())
    out.update(mpi_report())
    return out


def format_report(r: dict) -> str:
    lines = [
        f"CPU cores:            {r['cpu_cores']}",
        f"numba:                {r['numba_version']} (threads {r['numba_threads']}, layer {r['threading_layer']})",
        "CUDA:                 "
        + (
            "available: " + ", ".join(r["cuda_devices"])
            if r["cuda_available"]
            else f"not available ({r['cuda_note']})"
        ),
        f"CUDA simulator:       {'on' if r['cuda_simulator'] else 'off'} (NUMBA_ENABLE_CUDASIM)",
        "GPU memory:           "
        + (f"{r['cuda_memory_gib']} GiB ({r.get('cuda_memory_free_gib')} GiB free)" if r.get("cuda_memory_gib") else "unknown"),
        f"numba-cuda:           {r.get('numba_cuda_version') or 'not installed (numba built-in CUDA target)'}",
        f"CUDA kernels:         {r.get('cuda_kernels')}",
        "MPI:                  "
        + (f"mpi4py {r['mpi4py_version']}" if r["mpi4py"] else "mpi4py not installed")
        + (f", launcher {r['mpi_launcher']}" if r["mpi_launcher"] else ", no mpiexec/mpirun on PATH"),
    ]
    if r.get("mpi_library"):
        lines.append(f"MPI library:          {r['mpi_library']}")
        lines.append(f"MPI ranks:            {r['mpi_ranks']} on {len(r['mpi_hosts'])} host(s): "
                     + ", ".join(r["mpi_hosts"]))
        if r["cuda_available"] and r["mpi_ranks"] > 1:
            n_gpus = max(len(r["cuda_devices"]), 1)
            lines.append(f"GPU per rank:         rank r uses CUDA device r % {n_gpus} "
                         "(compute.device=cuda or auto)")
    return "\n".join(lines)
