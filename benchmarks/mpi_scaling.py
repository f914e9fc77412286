"""`benchmarks/run.py --mpi N,...`: dials.vmerge under mpiexec at N ranks on this machine.

For a simulated rotation dataset and a simulated stills dataset, each N runs
`mpiexec -n N python benchmarks/mpi_rank.py ... dials.vmerge ...` (N = 1: no launcher) and
records the wall time, the peak RSS of every rank, and the time, number and size of the
reductions (Allgatherv of the block-sum tree nodes of the target/gradient/normal matrix; the
time includes waiting for the slowest rank). From the N = 1 and N = 2 runs a strong-scaling
model to 64 ranks is fitted (see model_times and the README section "Running under MPI").

    python benchmarks/run.py --mpi 1,2 --mpi-rotation-obs 2e5 --mpi-stills 2000
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
TIMEOUT_S = 3600
# Assumed interconnect for the model (a commodity cluster, not measured here).
LATENCY_S = 5e-6
BANDWIDTH_BYTES_S = 5e9


def _launcher():
    path = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        raise SystemExit("benchmarks --mpi: no mpiexec (pip install 'dials-vmerge[mpi]')")
    return path


def simulate(workdir, kind, size, seed):
    d = os.path.join(workdir, f"{kind}_{size}")
    os.makedirs(d, exist_ok=True)
    done = os.path.join(d, "simulated.done")
    if os.path.exists(done):  # a --workdir kept from an earlier run: same size and seed
        if open(done).read() == str(seed):
            return d
    if kind == "rotation":
        args = [f"n_obs_target={size}", "rotation.n_sweeps=4", f"seed={seed}"]
    else:
        args = ["mode=stills", f"stills.n_images={size}", "model=KB", f"seed={seed}"]
    subprocess.run([os.path.join(BIN, "dials.vmerge.simulate")] + args, cwd=d, check=True,
                   stdout=subprocess.DEVNULL, timeout=TIMEOUT_S)
    with open(done, "w") as f:
        f.write(str(seed))
    return d


def iterations(log_text):
    return sum(int(n) for n in re.findall(r"(?:LBFGS|LevMar)[^:]*: (\d+) iterations", log_text))


def run_ranks(data_dir, n_ranks, extra):
    out_dir = tempfile.mkdtemp(prefix=f"mpi{n_ranks}_", dir=data_dir)
    stem = os.path.join(out_dir, "ranks")
    command = [sys.executable, os.path.join(HERE, "mpi_rank.py"), stem, "dials.vmerge",
               os.path.join(data_dir, "simulated.expt"), os.path.join(data_dir, "simulated.refl"),
               "nproc=1"] + list(extra)
    if n_ranks > 1:
        command = [_launcher(), "-n", str(n_ranks)] + command
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, cwd=out_dir, check=True, stdout=subprocess.DEVNULL,
                   timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    ranks = [json.load(open(p)) for p in sorted(glob.glob(stem + ".rank*.json"))]
    log = open(os.path.join(out_dir, "dials.vmerge.log")).read()
    n_iter = iterations(log)
    root = ranks[0]
    record = {
        "ranks": n_ranks, "wall_s": wall,
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
        "reductions": root["comm_reductions"],
        "comm_s": root["comm_seconds"],
        "bytes_per_reduction": (root["comm_bytes_per_rank"] / root["comm_reductions"]
                                if root["comm_reductions"] else 0.0),
        "minimiser_iterations": n_iter,
        "sharded_compute_s_per_rank": [r["sharded_compute_s"] for r in ranks],
        "sharded_calls": root["sharded_calls"],
        "cpu_s_per_rank": [r.get("cpu_s") for r in ranks],
        "comm_s_per_iteration": root["comm_seconds"] / n_iter if n_iter else None,
        # other jobs on a shared machine slow the ranks: the 1-minute load around the run
        "load_average_before_after": [load_before, load_after],
    }
    if "stack_at_peak" in root:  # VMERGE_PEAK_STACK=1 (benchmarks/mpi_rank.py)
        record["stack_at_peak_per_rank"] = [r["stack_at_peak"] for r in ranks]
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


def model_times(one, two, ranks=(1, 2, 4, 8, 16, 32, 64)):
    """T(N) = T_serial + T_parallel / N + R (L ceil(log2 N) + B N / bandwidth).

    Fitted to CPU time, not wall time (this machine's two cores are shared with other jobs):
    with C1 the one-rank CPU seconds and C2 the largest per-rank CPU seconds at N = 2,
    C1 = T_serial + T_parallel and C2 = T_serial + T_parallel / 2, so T_parallel =
    2 (C1 - C2) and T_serial = 2 C2 - C1 (the work every rank repeats or that one rank does
    alone: start-up, the partition pass over all rows, group-level decisions, writing on
    rank 0, plus waiting, which a busy machine adds to C2). R reductions of B bytes each
    (measured at N = 2) are modelled as an Allgather whose cost grows with N."""
    c1 = one["cpu_s_per_rank"][0]
    c2 = max(two["cpu_s_per_rank"])
    t_parallel = max(0.0, 2.0 * (c1 - c2))
    t_serial = max(0.0, c1 - t_parallel)
    reductions, size = two["reductions"], two["bytes_per_reduction"]
    out = {}
    for n in ranks:
        comm = 0.0 if n == 1 else reductions * (LATENCY_S * math.ceil(math.log2(n))
                                                + size * n / BANDWIDTH_BYTES_S)
        out[n] = {"modelled_wall_s": t_serial + t_parallel / n + comm, "modelled_comm_s": comm}
    return {"t_parallel_s": t_parallel, "t_serial_s": t_serial, "cpu_s_one_rank": c1,
            "cpu_s_two_ranks_max": c2, "by_ranks": out}


def run_mpi_benchmark(rank_counts, rotation_obs, stills_images, workdir, out_path, seed=1):
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="vmerge_mpi_bench_")
    results = {"rank_counts": rank_counts, "datasets": []}
    try:
        for kind, size in (("rotation", rotation_obs), ("stills", stills_images)):
            if not size:
                continue
            data_dir = simulate(workdir, kind, size, seed)
            rows = [run_ranks(data_dir, n, []) for n in rank_counts]
            entry = {"kind": kind, "size": size, "runs": rows}
            by_n = {r["ranks"]: r for r in rows}
            if 1 in by_n and 2 in by_n:
                entry["model"] = model_times(by_n[1], by_n[2])
                entry["peak_rss_ratio_2_over_1"] = (max(by_n[2]["peak_rss_mib_per_rank"])
                                                    / max(by_n[1]["peak_rss_mib_per_rank"]))
            results["datasets"].append(entry)
            print(format_table(entry), flush=True)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(entry):
    unit = "observations" if entry["kind"] == "rotation" else "stills"
    lines = [f"{entry['kind']} ({entry['size']} {unit})",
             "ranks  wall_s  CPU_s/rank  peak_RSS_MiB/rank  sharded_s/rank  reductions  comm_s  KB/reduction  comm_ms/iter"]
    for r in entry["runs"]:
        per_iter = r["comm_s_per_iteration"]
        lines.append(
            f"{r['ranks']:5d}  {r['wall_s']:6.1f}  "
            f"{'/'.join(f'{c:.0f}' for c in r['cpu_s_per_rank']):>10}  "
            f"{'/'.join(f'{m:.0f}' for m in r['peak_rss_mib_per_rank']):>17}  "
            f"{'/'.join(f'{t:.2f}' for t in r['sharded_compute_s_per_rank']):>14}  "
            f"{r['reductions']:10d}  {r['comm_s']:6.2f}  {r['bytes_per_reduction'] / 1e3:12.1f}  "
            f"{(per_iter or 0) * 1e3:12.2f}")
    if "model" in entry:
        m = entry["model"]
        lines.append(f"model: T_serial {m['t_serial_s']:.1f} s, T_parallel {m['t_parallel_s']:.1f} s; "
                     + ", ".join(f"N={n}: {v['modelled_wall_s']:.1f} s"
                                 for n, v in m["by_ranks"].items()))
        lines.append(f"peak RSS ratio N=2 / N=1: {entry['peak_rss_ratio_2_over_1']:.2f}")
    return "\n".join(lines)
