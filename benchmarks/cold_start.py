#!/usr/bin/env python
"""Cold start: the first dials.vmerge run on a machine compiles every numba kernel.

Runs `dials.vmerge` on the example quartz sweep (1 404 merged observations) three times
in fresh processes sharing one empty numba cache directory: the first run compiles
(cold), the next ones load the cache (warm). The difference is the compile time a new
user pays once (issue 15 target: under 10 s). The machine may be shared, so the CPU time of
each run (user + system, all threads, from the child's rusage) is reported beside the wall
time, with the load average; compile CPU time = cold CPU - warm CPU. Prints a table and
writes JSON.

    python benchmarks/cold_start.py --out cold_start.json

`--per-kernel` instead runs one cold process and lists the compile CPU time of every numba
dispatcher it compiled (numba's compile events; exclusive = without the helpers and numpy
overloads compiled inside it), largest first: where a cold start goes. `--inputs EXPT REFL`
runs another job, e.g. a simulated sweep large enough (>= 50 000 rows) that the parallel
builds of kernels/size_dispatch.py compile beside the serial ones, which shows what prange
costs to compile per kernel.

    python benchmarks/cold_start.py --per-kernel --out per_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = [os.path.join(HERE, "..", "examples", name)
           for name in ("integrated.expt", "integrated.refl")]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(work: str, cache: str):
    """(wall s, CPU s) of one dials.vmerge process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    code = "import sys; from dials_vmerge.command_line.vmerge import main; sys.exit(main())"
    cpu_before = _children_cpu_s()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *EXAMPLE], cwd=work, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dials.vmerge failed:\n{result.stderr}")
    return seconds, _children_cpu_s() - cpu_before


# Runs in a fresh process with an empty cache: dials.vmerge in process, timing each compile.
PER_KERNEL_PROBE = """
import json, sys, time
import dials_vmerge
from numba.core import event

open_compiles = []  # [dispatcher, CPU at start, CPU of nested compiles]
records = []


class CompileTimer(event.Listener):
    def on_start(self, ev):
        open_compiles.append([ev.data["dispatcher"], time.process_time(), 0.0])

    def on_end(self, ev):
        dispatcher, start, nested = open_compiles.pop()
        seconds = time.process_time() - start
        if open_compiles:
            open_compiles[-1][2] += seconds
        func = dispatcher.py_func
        records.append((func.__module__ + "." + func.__qualname__, seconds, seconds - nested))


event.register("numba:compile", CompileTimer())
from dials_vmerge.command_line.vmerge import main
start = time.process_time()
code = main(sys.argv[1:])
total = time.process_time() - start
print(json.dumps({"code": code, "run_cpu_s": total, "compiles": records}))
"""


def per_kernel(inputs, out_path: str) -> None:
    """One cold run: compile CPU seconds per dispatcher, largest exclusive time first."""
    root = tempfile.mkdtemp(prefix="vmerge_cold_")
    load_before = os.getloadavg()
    try:
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(root, "numba_cache"))
        result = subprocess.run([sys.executable, "-c", PER_KERNEL_PROBE, *inputs], cwd=root,
                                env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"dials.vmerge failed:\n{result.stderr}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {}
    for name, inclusive, exclusive in probe["compiles"]:
        entry = kernels.setdefault(name, {"kernel": name, "compiles": 0, "inclusive_cpu_s": 0.0,
                                          "exclusive_cpu_s": 0.0})
        entry["compiles"] += 1
        entry["inclusive_cpu_s"] += inclusive
        entry["exclusive_cpu_s"] += exclusive
    rows = sorted(kernels.values(), key=lambda e: -e["exclusive_cpu_s"])
    compile_cpu = sum(e["exclusive_cpu_s"] for e in rows)
    print("| kernel | compiles | exclusive CPU (s) | with its helpers (s) |")
    print("|---|---|---|---|")
    for e in rows:
        print(f"| {e['kernel']} | {e['compiles']} | {e['exclusive_cpu_s']:.2f} | "
              f"{e['inclusive_cpu_s']:.2f} |")
    print(f"\n{len(probe['compiles'])} compiles, {compile_cpu:.1f} s of compile CPU in a run of "
          f"{probe['run_cpu_s']:.1f} s CPU; load average {load_before[0]:.1f} before")
    with open(out_path, "w") as f:
        json.dump({"benchmark": "cold_start_per_kernel", "inputs": list(inputs),
                   "compile_cpu_s": compile_cpu, "run_cpu_s": probe["run_cpu_s"],
                   "load_average_1min_before": load_before[0], "kernels": rows}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default="cold_start.json")
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--per-kernel", action="store_true",
                        help="one cold run: compile CPU time per numba dispatcher")
    parser.add_argument("--inputs", nargs=2, metavar=("EXPT", "REFL"), default=EXAMPLE,
                        help="the job of --per-kernel (default: the quartz example)")
    args = parser.parse_args()
    if args.per_kernel:
        per_kernel([os.path.abspath(p) for p in args.inputs], args.out)
        return
    root = tempfile.mkdtemp(prefix="vmerge_cold_")
    load_before = os.getloadavg()
    try:
        cache = os.path.join(root, "numba_cache")
        runs = []
        for n in range(1 + args.warm_runs):
            work = os.path.join(root, f"run{n}")
            os.makedirs(work)
            runs.append(timed_run(work, cache))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    walls = [wall for wall, _ in runs]
    cpus = [cpu for _, cpu in runs]
    record = {"benchmark": "cold_start", "example": "quartz (examples/)",
              "cold_s": walls[0], "warm_s": walls[1:], "compile_s": walls[0] - min(walls[1:]),
              "cold_cpu_s": cpus[0], "warm_cpu_s": cpus[1:],
              "compile_cpu_s": cpus[0] - min(cpus[1:]),
              "load_average_1min_before_after": [load_before[0], load_after[0]],
              "target_compile_s": 10.0, "cpus": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version()}
    print("| run | wall time (s) | CPU time (s) |")
    print("|---|---|---|")
    print(f"| first, empty cache (cold) | {walls[0]:.1f} | {cpus[0]:.1f} |")
    for n, (wall, cpu) in enumerate(runs[1:], 1):
        print(f"| run {n + 1}, cache filled (warm) | {wall:.1f} | {cpu:.1f} |")
    print(f"\ncompile time paid once: {record['compile_s']:.1f} s wall, "
          f"{record['compile_cpu_s']:.1f} s CPU (target < 10 s); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
