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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default="cold_start.json")
    parser.add_argument("--warm-runs", type=int, default=2)
    args = parser.parse_args()
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
