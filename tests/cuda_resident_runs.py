"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_resident_rounds.py: small scaling jobs (KB
stills, physical and array rotation sweeps, a job of three model families) with
compute.device=cuda and on the CPU. Every host->device copy is recorded at the numba.cuda
API with its dtype and shape (cuda_transfer_recorder.py), each scaling round's table size
and whether the device built it from the job's resident columns. Writes JSON (argv[1]); the
test makes every assertion."""

import copy
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dials_vmerge  # noqa: F401,E402  (cctbx before numba)
import cuda_transfer_recorder as recorder  # noqa: E402
import numpy as np  # noqa: E402

recorder.install()

from cuda_simulator_runs import mixed_simulation, scaling_params  # noqa: E402
from dials_vmerge.backends import cuda_job_table, cuda_resident_inputs, run_device  # noqa: E402
from dials_vmerge.io.expt import ExperimentList  # noqa: E402
from dials_vmerge.kernels.cuda import resident_rows as rr  # noqa: E402
from dials_vmerge.pipeline import run_scaling_job  # noqa: E402
from dials_vmerge.simulate import simulate_rotation, simulate_stills  # noqa: E402

LOG = logging.getLogger("cuda_resident_runs")
ORIGINAL = run_device.make_scaling_target


def run(simulation, options, rounds=None):
    import time
    t0 = time.perf_counter()
    try:
        return _run(simulation, options, rounds)
    finally:
        print(f"{options[0]} {options[-1]}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _run(simulation, options, rounds=None):
    def hook(device, manager, ih_table, *args, **kwargs):
        target = ORIGINAL(device, manager, ih_table, *args, **kwargs)
        if rounds is not None:
            entry = {"table_rows": int(ih_table.n_obs), "kind": target.kind,
                     "resident": getattr(target, "_device_cols", None) is not None,
                     "n_par": int(target.n_par), "normal_calls": 0,
                     # a job of several model families: each family's device kernel
                     "families": sorted(f.kind for f in target._mixed.families)
                     if getattr(target, "_mixed", None) is not None else [],
                     "family_rows": sorted(f.n for f in target._mixed.families)
                     if getattr(target, "_mixed", None) is not None else [],
                     "n_full": int(sum(m.n_parameters for m in manager.models))}
            rounds.append(entry)
            normal_equations = target.normal_equations

            def counted(x):  # a full-matrix round
                entry["normal_calls"] += 1
                return normal_equations(x)

            target.normal_equations = counted
        return target

    run_device.make_scaling_target = hook
    experiments_dict, table, _ = simulation
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    _, scaled, _ = run_scaling_job(scaling_params(*options), experiments, table.copy(), LOG)
    run_device.make_scaling_target = ORIGINAL
    return (np.asarray(scaled["inverse_scale_factor"]),
            np.asarray(scaled["intensity.scale.value"]))


# A low outlier_zmax rejects rows between rounds and intensity_ranges with a high
# Isigma cut selects a subset: each round's table is a new subset of the job's rows.
SUBSET = ("scaling_options.outlier_zmax=3.0", "reflection_selection.method=intensity_ranges",
          "reflection_selection.Isigma_range=3.0,0.0")
CASES = {
    "kb": (lambda: simulate_stills(n_stills=20, d_min=8.0, seed=5),
           ("model=KB", "scaling_options.outlier_zmax=3.0")),
    "physical": (lambda: simulate_rotation(n_obs_target=300, n_sweeps=2, model="physical",
                                           seed=7),
                 ("model=physical", "scaling_refinery.full_matrix_max_iterations=1",
                  *SUBSET)),
    "array": (lambda: simulate_rotation(n_obs_target=400, n_sweeps=2, model="array", seed=7),
              ("model=array", "array.n_resolution_bins=3", "array.n_absorption_bins=1",
               "array.decay_interval=60", "scaling_refinery.full_matrix_max_iterations=1",
               *SUBSET)),
}



# model=auto: physical with absorption, physical without, KB (a job of three families)
# (no full-matrix round: its normal equations over the mixed table, ~20 s under the
# simulator, are compared with the CPU's in tests/test_cuda_mixed_models.py)
CASES["mixed"] = (mixed_simulation, ("scaling_options.full_matrix=False", *SUBSET))


# "kb_radix": the KB job with the column entries' count budget lowered below its columns,
# so each round's entries take the radix plan of kernels/cuda/resident_rows.py (the plan of
# few segments and many columns: ~1e7 observations of 4e4 stills in one batch), which
# before issue 12's last part went up from the host every round. Its CPU run and the run
# uploading each round's table are the "kb" case's (run first in the same process).
CASES["kb_radix"] = CASES["kb"]
RADIX_COUNT_BUDGET = 32


def gpu_run(name, simulation, options, rounds):
    """The compute.device=cuda run; kb_radix with the lowered budget, recording the plan
    of every column-entry derivation."""
    if name != "kb_radix":
        return run(simulation, (*options, "compute.device=cuda"), rounds), []
    plans, plan, budget = [], rr.entry_plan, rr.ENTRY_COUNT_BUDGET

    def recorded(*args):
        plans.append(plan(*args))
        return plans[-1]

    rr.entry_plan, rr.ENTRY_COUNT_BUDGET = recorded, RADIX_COUNT_BUDGET
    try:
        return run(simulation, (*options, "compute.device=cuda"), rounds), plans
    finally:
        rr.entry_plan, rr.ENTRY_COUNT_BUDGET = plan, budget


class LogLines(logging.Handler):
    """The run's log messages (the device passes it names)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(out_path, names):
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    out = {}
    for name in names:
        make, options = CASES[name]
        simulation = make()
        rounds = []
        recorder.DETAILS.clear()
        log = LogLines()
        LOG.addHandler(log)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        try:
            (g_gpu, i_gpu), plans = gpu_run(name, simulation, options, rounds)
        finally:
            LOG.removeHandler(log)
            LOG.setLevel(logging.NOTSET)
            LOG.propagate = True
        store = cuda_job_table.current_job_table()
        # the job's rows: its resident I (all suitable rows of every dataset)
        job_rows = int(store._entries["intensity"].device.shape[0])
        details = list(recorder.DETAILS)
        if name == "kb_radix":
            kb = out["kb"]
            out[name] = {"g": [kb["g"][0], g_gpu.tolist(), kb["g"][2], kb["g"][1]],
                         "i": [kb["i"][0], i_gpu.tolist(), kb["i"][2], kb["i"][1]],
                         "upload_rounds": kb["upload_rounds"], "plans": plans,
                         "rounds": rounds, "job_rows": job_rows,
                         "transfers": store.summary(), "copies": details}
            continue
        g_cpu, i_cpu = run(simulation, (*options, "compute.device=cpu"))
        if name in ("physical", "mixed"):  # the slowest under the simulator: no third run
            # (mixed: the uploaded and the resident inputs give the same device arrays,
            # tests/test_cuda_mixed_models.py)
            out[name] = {"g": [g_cpu.tolist(), g_gpu.tolist()],
                         "i": [i_cpu.tolist(), i_gpu.tolist()], "upload_rounds": [],
                         "rounds": rounds, "job_rows": job_rows,
                         "transfers": store.summary(), "copies": details,
                         "log": [line for line in log.lines if "device" in line]}
            continue
        # the same job with each round's table uploaded (the path before resident tables)
        resident = cuda_resident_inputs.resident_minimisation
        cuda_resident_inputs.resident_minimisation = lambda run, table: None
        upload_rounds = []
        g_up, i_up = run(simulation, (*options, "compute.device=cuda"), upload_rounds)
        cuda_resident_inputs.resident_minimisation = resident
        out[name] = {"g": [g_cpu.tolist(), g_gpu.tolist(), g_up.tolist()],
                     "i": [i_cpu.tolist(), i_gpu.tolist(), i_up.tolist()],
                     "upload_rounds": upload_rounds,
                     "rounds": rounds, "job_rows": job_rows,
                     "transfers": store.summary(), "copies": details}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
