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
        if available:
            for dev in cuda.list_devices():
                devices.append(dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name))
        reason = "" if available else "no CUDA driver or GPU visible to numba"
    except Exception as e:  # the CUDA target is optional
        available, devices, reason = False, [], f"numba.cuda unusable ({type(e).__name__})"
    return {"cuda_available": available, "cuda_devices": devices, "cuda_simulator": simulator, "cuda_note": reason}


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
        "MPI:                  "
        + (f"mpi4py {r['mpi4py_version']}" if r["mpi4py"] else "mpi4py not installed")
        + (f", launcher {r['mpi_launcher']}" if r["mpi_launcher"] else ", no mpiexec/mpirun on PATH"),
    ]
    if r.get("mpi_library"):
        lines.append(f"MPI library:          {r['mpi_library']}")
        lines.append(f"MPI ranks:            {r['mpi_ranks']} on {len(r['mpi_hosts'])} host(s): "
                     + ", ".join(r["mpi_hosts"]))
    return "\n".join(lines)
