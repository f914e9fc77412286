"""The prepared MPI-on-GPU check (issue 11): dials.vmerge with compute.device=cuda as one
process and under mpiexec -n 2 (and more), on simulated data; outputs compared bit for bit,
the one-process CPU run to 1e-10 relative, wall times recorded.

Needs the whole package (cctbx, mpi4py, mpich: `pip install -e '.[mpi]'`) and a GPU; rank r
uses device r % (visible devices) (backends/select.py select_rank_device), so on a machine
with one GPU all ranks share it. From the repository root:

    python benchmarks/gpu_mpi_check.py --out gpu_mpi_check.json          # 2e5 rotation, 2e3 stills
    python benchmarks/gpu_mpi_check.py --ranks 2 4 --n-obs 1e6
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_mpi_check.py --n-obs 1000 --stills 50 \\
        --stills-d-min 8 --ranks 2 --block-observations 300                 # simulator smoke test

--block-observations other than 4096 runs the program through tests/cuda_rank_local_driver.py
(the job's key blocks made smaller so that tiny simulator data still has several blocks).
Nothing here claims a GPU figure: the JSON holds what the run measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.dirname(sys.executable)
DRIVER = os.path.join(ROOT, "tests", "cuda_rank_local_driver.py")


def _launcher():
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
        if path:
            return path
    raise SystemExit("gpu_mpi_check: no mpiexec (pip install -e '.[mpi]')")


def _program(block_observations):
    if block_observations == 4096:
        return [os.path.join(BIN, "dials.vmerge")]
    return [sys.executable, DRIVER, str(block_observations)]


def _run(command, cwd, timeout_s):
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"gpu_mpi_check: {' '.join(command[:4])} ... failed:\n{done.stderr}")
    return wall


def _outputs(d):
    import numpy as np

    import dials_vmerge  # noqa: F401
    import gemmi
    from dials_vmerge.io import read_reflections

    refl = read_reflections(os.path.join(d, "scaled.refl"))
    out = {name: np.asarray(refl[name]) for name in
           ("inverse_scale_factor", "inverse_scale_factor_variance", "intensity.scale.value",
            "flags")}
    mtz = gemmi.read_mtz_file(os.path.join(d, "merged.mtz"))
    for label in ("IMEAN", "SIGIMEAN"):
        out[label] = np.array(mtz.column_with_label(label), dtype=np.float64)
    return out


def _max_relative(a, b):
    import numpy as np

    if a.dtype.kind not in "f":
        return 0.0 if np.array_equal(a, b) else float("inf")
    scale = np.maximum(np.abs(b), 1e-300)
    return float(np.max(np.abs(a - b) / scale)) if a.size else 0.0


def check(name, simulate_args, ranks, block_observations, work, timeout_s):
    import numpy as np

    data = os.path.join(work, name)
    os.makedirs(data)
    subprocess.run([os.path.join(BIN, "dials.vmerge.simulate")] + simulate_args, cwd=data,
                   check=True, capture_output=True, timeout=timeout_s)
    inputs = [os.path.join(data, "simulated.expt"), os.path.join(data, "simulated.refl")]
    result = {"simulate": simulate_args, "wall_s": {}}
    runs = {}
    for label, n, device in ([("cpu", None, "cpu"), ("cuda_1", None, "cuda")]
                             + [(f"cuda_{n}", n, "cuda") for n in ranks]):
        d = os.path.join(work, f"{name}_{label}")
        os.makedirs(d)
        command = _program(block_observations) + inputs + [f"compute.device={device}"]
        if n is not None:
            command = [_launcher(), "-n", str(n)] + command
        result["wall_s"][label] = round(_run(command, d, timeout_s), 2)
        runs[label] = _outputs(d)
    one = runs["cuda_1"]
    result["same_bits_as_one_process"] = {
        label: all(np.array_equal(runs[label][k], v) for k, v in one.items())
        for label in runs if label.startswith("cuda_") and label != "cuda_1"}
    result["cuda_vs_cpu_max_relative"] = {k: _max_relative(v, runs["cpu"][k])
                                          for k, v in one.items()}
    result["ok"] = (all(result["same_bits_as_one_process"].values())
                    and max(result["cuda_vs_cpu_max_relative"].values()) <= 1e-10)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--n-obs", type=float, default=2e5)
    parser.add_argument("--stills", type=int, default=2000)
    parser.add_argument("--stills-d-min", type=float, default=None,
                        help="crystal.d_min of the stills (default: the simulator's)")
    parser.add_argument("--block-observations", type=int, default=4096)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    report = {"cuda_simulator": os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"}
    with tempfile.TemporaryDirectory(prefix="gpu_mpi_check_") as work:
        report["rotation"] = check(
            "rotation", ["rotation.n_sweeps=2", f"n_obs_target={int(args.n_obs)}", "seed=5"],
            args.ranks, args.block_observations, work, args.timeout)
        report["stills"] = check(
            "stills", ["mode=stills", f"stills.n_images={args.stills}", "model=KB", "seed=4"]
            + ([] if args.stills_d_min is None else [f"crystal.d_min={args.stills_d_min}"]),
            args.ranks, args.block_observations, work, args.timeout)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["rotation"]["ok"] and report["stills"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
