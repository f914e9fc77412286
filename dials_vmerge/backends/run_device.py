"""Which target a scaling round uses (compute.device), without importing numba.cuda on CPU runs.

The hook of ScalingRun.minimise is target_for_run; the CUDA target lives in cuda_scaling.py.
"""

from __future__ import annotations

# Below this many observations in a job, compute.device=auto stays on the CPU: copies and
# launches cost more than the passes.
AUTO_MIN_OBSERVATIONS = 1_000_000


def make_scaling_target(device, manager, ih_table, nproc=1, batch_size=None,
                        device_memory_limit=None, device_columns=None):
    """The target of one minimisation for the chosen device ('cpu' or 'cuda');
    device_columns: see CudaScalingTarget."""
    if device == "cuda":
        from .cuda_scaling import CudaScalingTarget

        return CudaScalingTarget(manager, ih_table, nproc, batch_size,
                                 device_memory_limit=device_memory_limit,
                                 device_columns=device_columns)
    from ..scaling.target import ScalingTarget

    return ScalingTarget(manager, ih_table, nproc)


def resolve_run_device(params, n_obs):
    """'cpu' or 'cuda' for a scaling job of n_obs observations: cuda insists on the GPU,
    auto takes it only when a GPU is visible and the job is large."""
    from .select import choose_device

    requested = str(getattr(getattr(params, "compute", None), "device", "cpu") or "cpu")
    device = choose_device(requested)
    if requested.strip().lower() == "auto" and n_obs < AUTO_MIN_OBSERVATIONS:
        return "cpu"
    return device


def target_for_run(run, manager, ih_table):
    """The hook of ScalingRun.minimise: the device is resolved once per scaling job (from
    compute.device and the job's size) and logged; every round then builds its target on it,
    copying that round's observation arrays to the device once."""
    from . import rank_local

    # the job's observations over all ranks of a rank-local job (compute.device=auto's size
    # test, asked once per job): every rank resolves the same device
    device = getattr(run, "_compute_device", None) or device_for_run(
        run, rank_local.total(ih_table.n_obs))
    limit = getattr(run, "_gpu_memory_limit", None)
    columns = None
    if device == "cuda":
        # the table's I and weights gathered from the job's resident arrays (only its row
        # order goes up), not copied every round
        from .cuda_job_table import minimisation_columns
        from .cuda_resident_inputs import resident_minimisation

        def columns():
            # the whole table made on the device from the job's resident columns (only a
            # keep flag per job row goes up, when the subset changed); else I and w gathered
            return (resident_minimisation(run, ih_table)
                    or minimisation_columns(run, ih_table))
    if limit is None:
        target = make_scaling_target(device, manager, ih_table, run.nproc,
                                     getattr(run, "_gpu_batch_size", None),
                                     device_columns=columns)
    else:
        target = make_scaling_target(device, manager, ih_table, run.nproc,
                                     getattr(run, "_gpu_batch_size", None),
                                     device_memory_limit=limit, device_columns=columns)
    if device == "cuda" and getattr(target, "host_resident", False):
        run.log(f"  the layout ({target.n_obs} observations) exceeds the device memory: "
                f"streamed from the host in "
                f"{len(target._device_target.batches)} batch(es) of whole groups")
    if device == "cuda":
        key_bounds = getattr(target, "_key_bounds", None)
        if key_bounds is not None:
            # the job's key blocks (the same for any number of MPI ranks: so is the log)
            run.log(f"  device target: {target.kind} model, {target.n_obs} observations, "
                    f"{len(target.key_blocks[0]) - 1} key block(s)")
        else:
            n_batches = (len(target._device_target.batches)
                         if target._device_target is not None else 0)
            run.log(f"  device target: {target.kind} model, {target.n_obs} observations, "
                    f"{n_batches} batch(es)")
    return target


# The device of the passes after scaling (merging, statistics sums) of the current job: set
# when a scaling job resolves its device, "cpu" until then.
_PASS_DEVICE = ["cpu"]


def pass_device():
    return _PASS_DEVICE[0]


def device_for_run(run, n_obs):
    """The run's device for its per-observation passes, resolved once per scaling job (from
    compute.device and the size of the first table that asks) and logged."""
    device = getattr(run, "_compute_device", None)
    if device is None:
        params = run.params
        device = resolve_run_device(params, n_obs)
        batch = getattr(getattr(getattr(params, "compute", None), "gpu", None), "batch_size",
                        None)
        run._compute_device = device
        _PASS_DEVICE[0] = device
        # libtbx's Auto (and None) mean: from free device memory
        run._gpu_batch_size = batch if isinstance(batch, int) else None
        limit = getattr(getattr(getattr(params, "compute", None), "gpu", None),
                        "device_memory_limit", None)
        run._gpu_memory_limit = limit if isinstance(limit, int) else None
        if device == "cuda":
            # one device copy of the job's observation arrays for all its passes
            from .cuda_job_table import new_job_table

            new_job_table()
            run.log(f"compute.device: scaling target and gradient kernels run on the CUDA "
                    f"device ({device_name()})")
            run.log("  also on the device: model evaluation (KB, physical, array, and jobs "
                    "mixing them: a kernel per family), the normal "
                    "equations of full-matrix rounds, g and var(g) of every reflection, "
                    "outlier rejection, the error-model sums, merging (classical, robust, "
                    "variational) and the merging-statistics sums; each scaling round's "
                    "minimisation table is made there from the job's resident columns")
            run.log("  on the host: the E^2 outlier test after the device's z-tests, the "
                    "error model's regression fit (minimisation=regression), the likelihood "
                    "target, g and dg/dp of models without a device kernel, and those of a "
                    "job of several model families whose layout is streamed from the host")
    return device


def device_name():
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1":
        return "numba CUDA simulator"
    try:
        from numba import cuda

        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    except Exception:
        name = "unknown GPU"
    return name


def device_transfer_report(log=None):
    """{"device_transfers": bytes host->device per pass} of the current CUDA job (logged when
    log is given); {} on a CPU run."""
    if pass_device() != "cuda":
        return {}
    from .cuda_job_table import current_job_table, transfer_lines

    table = current_job_table()
    if log is not None:
        for line in transfer_lines(table):
            log(line)
    return {"device_transfers": table.summary()}
