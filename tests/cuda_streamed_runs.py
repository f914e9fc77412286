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
# the mixed job's memory limit: its layout does not fit, a few batches of ~100 rows do
# (the simulator's launches are slow: 20_000 gives ~90 batches of a few rows)
MIXED_LIMIT = 300_000


class _Compared(Exception):
    """Ends a job once its first minimisation table was compared (nothing else is used)."""


def record_copies(target):
    """Every host->device copy of each target and normal-equation call of target, from
    cuda_transfer_recorder (the numba.cuda API, not the job table's counter): per call the
    floating-point bytes copied; and the host evaluations of g and dg/dp (target._ell)."""
    import cuda_transfer_recorder as recorder

    record = {"float_bytes": [], "ell_calls": 0}
    host_ell = target._ell

    def ell(*args):
        record["ell_calls"] += 1
        return host_ell(*args)

    def recorded(call):
        def run_call(x):
            start = len(recorder.DETAILS)
            result = call(x)
            record["float_bytes"].append(sum(c[2] for c in recorder.DETAILS[start:]
                                             if c[3] == "f"))
            return result
        return run_call

    target._ell = ell
    target.value_and_gradient = recorded(target.value_and_gradient)
    target.normal_equations = recorded(target.normal_equations)
    return record


def save_record(out, key, target, record):
    out[f"{key}_float_bytes"] = np.array(record["float_bytes"])
    out[f"{key}_ell_calls"] = np.array(record["ell_calls"])
    roles = [role for call in target._store.transfers.get("scaling target", [])
             for role in call["uploads"]]
    out[f"{key}_host_model_uploads"] = np.array(roles.count("host-model g"))


def compare_targets(manager, table, out, name, normal=True, limit=20_000, normal_points=2):
    """Phi and gradient at the start and at a moved point: device-resident, host-streamed
    (same batch size; then an automatic one from a tiny memory limit) and the CPU target;
    the normal equations at the last normal_points points."""
    x0 = manager.get_free()
    rng = np.random.default_rng(3)
    points = [x0, x0 * (1.0 + 0.02 * rng.standard_normal(x0.size))]
    resident = CudaScalingTarget(manager, table, 1, TINY_BATCH, host_resident=False)
    streamed = CudaScalingTarget(manager, table, 1, TINY_BATCH, host_resident=True)
    limited = CudaScalingTarget(manager, table, 1, None, device_memory_limit=limit)
    cpu = ScalingTarget(manager, table, 1)
    records = {}
    if name == "mixed":
        records = {key: (t, record_copies(t)) for key, t in (("streamed", streamed),
                                                              ("limited", limited))}
    rows = []
    for x in points:
        values = [t.value_and_gradient(x) for t in (resident, streamed, limited, cpu)]
        rows.append(np.concatenate([[phi, *grad] for phi, grad in values]))
    out[f"{name}_values"] = np.array(rows)  # per point: (phi, grad) x 4 targets
    # the normal equations of a full-matrix round (phi, J^T W r, J^T W J): the streamed
    # batches on the device against the resident pass and the CPU kernel
    worst = {"streamed_cpu": 0.0, "limited_cpu": 0.0, "streamed_resident": 0.0}
    with_limited = normal_points == 2  # the mixed job's: ~8 s a call in the simulator
    if not with_limited:
        del worst["limited_cpu"]
    for x in (points[len(points) - normal_points:] if normal else []):
        ne = {key: t.normal_equations(x) for key, t in (("resident", resident),
                                                         ("streamed", streamed),
                                                         ("limited", limited), ("cpu", cpu))
              if with_limited or key != "limited"}
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
        and (not with_limited or getattr(limited, "_streamed_normal", None) is not None))
    out[f"{name}_normal_size"] = np.array(cpu.n_par)
    out[f"{name}_n_par"] = np.array(cpu.n_par)
    out[f"{name}_kinds"] = np.array([resident.kind, streamed.kind, limited.kind])
    out[f"{name}_host_resident"] = np.array([resident.host_resident, streamed.host_resident,
                                             limited.host_resident])
    out[f"{name}_n_batches"] = np.array([len(t._device_target.batches)
                                         for t in (resident, streamed, limited)])
    out[f"{name}_streamed_has_whole_g"] = np.array(hasattr(streamed, "_g"))
    if name == "mixed":
        # the copies of each streamed call against the table's own sizes: I and w (16 B a
        # row) and the families' floating-point inputs; g (8 B a row) and dg/dp would be more
        layout = streamed._mixed_host
        out["mixed_n_obs"] = np.array(table.n_obs)
        out["mixed_width"] = np.array(layout.width)
        out["mixed_family_float_bytes"] = np.array(sum(
            int(v.nbytes) for *_, inputs, _ in layout.families for k, v in inputs.items()
            if v is not None and k != "component_start" and v.dtype.kind == "f"))
        for key, (target, record) in records.items():
            save_record(out, f"mixed_{key}", target, record)
            if getattr(target, "_streamed_normal", None) is not None:
                # the normal pass's first call zeroes its per-stream partials (a host copy)
                out[f"mixed_{key}_normal_zeroed_bytes"] = np.array(sum(
                    int(s["normal_partial"].nbytes) for s in target._streamed_normal._scratch))
        # the host evaluation forced (the streamed mixed layout before this): the same
        # record shows its uploads of g and dg/dp
        mixed_layout = CudaScalingTarget._mixed_layout
        CudaScalingTarget._mixed_layout = lambda self: None
        try:
            host = CudaScalingTarget(manager, table, 1, TINY_BATCH, host_resident=True)
        finally:
            CudaScalingTarget._mixed_layout = mixed_layout
        out["mixed_host_kind"] = np.array(host.kind)
        record = record_copies(host)
        host.value_and_gradient(points[1])
        save_record(out, "mixed_host", host, record)
        raise _Compared


def run(simulation, *args, capture=None):
    experiments_dict, table, _ = simulation
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    if capture is not None:
        def make(device, manager, ih_table, nproc=1, batch_size=None, **kwargs):
            if not capture["done"]:
                capture["done"] = True
                compare_targets(manager, ih_table, capture["out"], capture["name"],
                                capture.get("normal", True), capture.get("limit", 20_000),
                                capture.get("normal_points", 2))
            return ORIGINAL(device, manager, ih_table, nproc, batch_size, **kwargs)
        run_device.make_scaling_target = make
    try:
        _, scaled, _ = run_scaling_job(scaling_params(*args), experiments, table.copy(), LOG)
    except _Compared:
        return None
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
    if "mixed-job" in cases:
        mixed_job(out)
        np.savez(out_path, **out)
        return
    if "mixed" in cases:
        # three model families: on the device per family, resident or streamed batch by
        # batch (backends/cuda_streamed_scaling.py); the job ends after the comparison
        import cuda_transfer_recorder as recorder

        recorder.install()
        run(mixed_simulation(), "compute.device=cpu", "scaling_options.full_matrix=False",
            capture={"done": False, "out": out, "name": "mixed", "normal": True,
                     "limit": MIXED_LIMIT, "normal_points": 1})
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


def mixed_job(out):
    """The three-family job through compute.device=cuda with a memory limit that streams
    every round's table, against the CPU run: each round's target kind and whether it
    streamed, the uploads the job table counted, g and the scaled intensities."""
    targets = []

    def make(device, manager, ih_table, nproc=1, batch_size=None, **kwargs):
        target = ORIGINAL(device, manager, ih_table, nproc, batch_size, **kwargs)
        targets.append(target)
        return target

    run_device.make_scaling_target = make
    try:
        g_limit, i_limit = run(mixed_simulation(), "compute.device=cuda",
                               f"compute.gpu.device_memory_limit={MIXED_LIMIT}")
    finally:
        run_device.make_scaling_target = ORIGINAL
    g_cpu, i_cpu = run(mixed_simulation(), "compute.device=cpu")
    out["kinds"] = np.array([t.kind for t in targets])
    out["host_resident"] = np.array([t.host_resident for t in targets])
    out["n_batches"] = np.array([len(t._device_target.batches) for t in targets])
    roles = {role for t in targets for call in t._store.transfers.get("scaling target", [])
             for role in call["uploads"]}
    out["host_model_uploads"] = np.array("host-model g" in roles)
    out["g"] = np.stack([g_cpu, g_limit])
    out["i"] = np.stack([i_cpu, i_limit])


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
