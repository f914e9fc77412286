"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_streamed.py: the host-streamed scaling target
(a layout larger than device memory) against the device-resident one and the CPU target, and
a KB job with a forced tiny compute.gpu.device_memory_limit against the same job without.
Writes the comparisons to an .npz (argv[1]); all assertions are made by the test.
"""

import copy
import logging
import sys

import dials_vmerge  # noqa: F401  (cctbx before numba)
import numpy as np
from numba import cuda

from dials_vmerge.backends import run_device
from dials_vmerge.backends.cuda_scaling import CudaScalingTarget
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.scaling.target import ScalingTarget
from dials_vmerge.simulate import simulate_rotation, simulate_stills

from cuda_simulator_runs import mixed_simulation, scaling_params

LOG = logging.getLogger("cuda_streamed_runs")
assert cuda.is_available(), "run with NUMBA_ENABLE_CUDASIM=1"
ORIGINAL = run_device.make_scaling_target
TINY_BATCH = 40  # observations: many batches of whole groups on the two streams


def compare_targets(manager, table, out, name, normal=True):
    """Phi and gradient at the start and at a moved point: device-resident, host-streamed
    (same batch size; then an automatic one from a tiny memory limit) and the CPU target."""
    x0 = manager.get_free()
    rng = np.random.default_rng(3)
    points = [x0, x0 * (1.0 + 0.02 * rng.standard_normal(x0.size))]
    resident = CudaScalingTarget(manager, table, 1, TINY_BATCH, host_resident=False)
    streamed = CudaScalingTarget(manager, table, 1, TINY_BATCH, host_resident=True)
    limited = CudaScalingTarget(manager, table, 1, None, device_memory_limit=20_000)
    cpu = ScalingTarget(manager, table, 1)
    rows = []
    for x in points:
        values = [t.value_and_gradient(x) for t in (resident, streamed, limited, cpu)]
        rows.append(np.concatenate([[phi, *grad] for phi, grad in values]))
    out[f"{name}_values"] = np.array(rows)  # per point: (phi, grad) x 4 targets
    # the normal equations of a full-matrix round (phi, J^T W r, J^T W J): the streamed
    # batches on the device against the resident pass and the CPU kernel
    worst = {"streamed_cpu": 0.0, "limited_cpu": 0.0, "streamed_resident": 0.0}
    for x in (points if normal else []):
        ne = {key: t.normal_equations(x) for key, t in (("resident", resident),
                                                         ("streamed", streamed),
                                                         ("limited", limited), ("cpu", cpu))}
        for pair in worst:
            a, b = pair.split("_")
            for u, v in zip(ne[a], ne[b]):
                u, v = np.atleast_1d(u), np.atleast_1d(v)
                scale = max(float(np.max(np.abs(v))), 1e-300)
                worst[pair] = max(worst[pair], float(np.max(np.abs(u - v))) / scale)
    for pair, value in worst.items():
        out[f"{name}_normal_{pair}"] = np.array(value)
    out[f"{name}_normal_streamed_on_device"] = np.array(
        getattr(streamed, "_streamed_normal", None) is not None
        and getattr(limited, "_streamed_normal", None) is not None)
    out[f"{name}_normal_size"] = np.array(cpu.n_par)
    out[f"{name}_n_par"] = np.array(cpu.n_par)
    out[f"{name}_kinds"] = np.array([resident.kind, streamed.kind, limited.kind])
    out[f"{name}_host_resident"] = np.array([resident.host_resident, streamed.host_resident,
                                             limited.host_resident])
    out[f"{name}_n_batches"] = np.array([len(t._device_target.batches)
                                         for t in (resident, streamed, limited)])
    out[f"{name}_streamed_has_whole_g"] = np.array(hasattr(streamed, "_g"))


def run(simulation, *args, capture=None):
    experiments_dict, table, _ = simulation
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    if capture is not None:
        def make(device, manager, ih_table, nproc=1, batch_size=None, **kwargs):
            if not capture["done"]:
                capture["done"] = True
                compare_targets(manager, ih_table, capture["out"], capture["name"],
                                capture.get("normal", True))
            return ORIGINAL(device, manager, ih_table, nproc, batch_size, **kwargs)
        run_device.make_scaling_target = make
    try:
        _, scaled, _ = run_scaling_job(scaling_params(*args), experiments, table.copy(), LOG)
    finally:
        run_device.make_scaling_target = ORIGINAL
    return np.asarray(scaled["inverse_scale_factor"]), np.asarray(scaled["intensity.scale.value"])


def main(out_path, cases=("kb", "physical", "job")):
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = {}
    if "array" in cases:
        array_and_host_model(out)
        np.savez(out_path, **out)
        return
    if "mixed" in cases:
        # three model families: on the device per family when resident, streamed as a
        # host-evaluated model (backends/cuda_streamed_scaling.py); no normal equations
        # (~45 s of the simulator at 59 parameters; the mixed table's are compared with
        # the CPU's in test_cuda_mixed_models.py, the streamed host model's in "array")
        run(mixed_simulation(), "compute.device=cpu", "scaling_options.full_matrix=False",
            capture={"done": False, "out": out, "name": "mixed", "normal": False})
        np.savez(out_path, **out)
        return
    kb = simulate_stills(n_stills=20, d_min=8.0, seed=5)
    physical = simulate_rotation(n_obs_target=300, n_sweeps=2, model="physical", seed=7)
    # target level, on the first minimisation table of a CPU job (cheap to build)
    run(kb, "model=KB", "compute.device=cpu",
        capture={"done": False, "out": out, "name": "kb"})
    run(physical, "model=physical", "compute.device=cpu",
        "scaling_refinery.full_matrix_max_iterations=2",
        capture={"done": False, "out": out, "name": "physical"})
    # the whole KB job with a memory limit that forces streaming, and without
    g_limit, i_limit = run(kb, "model=KB", "compute.device=cuda",
                           "compute.gpu.device_memory_limit=20000")
    g_dev, i_dev = run(kb, "model=KB", "compute.device=cuda")
    out["job_g"] = np.stack([g_dev, g_limit])
    out["job_i"] = np.stack([i_dev, i_limit])
    np.savez(out_path, **out)


def array_and_host_model(out):
    # the array model's grids, and the same layout as a host-evaluated model (the array
    # device layout refused: g and dg/dp from the host models, streamed batch by batch)
    array = simulate_rotation(n_obs_target=200, n_sweeps=2, model="array", seed=7)
    array_args = ("model=array", "array.n_resolution_bins=3", "array.n_absorption_bins=1",
                  "array.decay_interval=60", "compute.device=cpu")
    run(array, *array_args, capture={"done": False, "out": out, "name": "array"})
    from dials_vmerge.backends import cuda_scaling

    layout = cuda_scaling.array_layout
    cuda_scaling.array_layout = lambda *args, **kwargs: None
    try:
        run(array, *array_args, capture={"done": False, "out": out, "name": "host-model"})
    finally:
        cuda_scaling.array_layout = layout


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]) or ("kb", "physical", "job"))
