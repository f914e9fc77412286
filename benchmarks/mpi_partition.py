"""Per-rank memory of the read stage with issue 11's read-time partition (benchmark only).

    python benchmarks/mpi_partition.py EXPT REFL [--ranks 1,2] [--json OUT.json]

For each N, `mpiexec -n N` (N = 1: no launcher) runs this file's `rank` mode: every rank
reads the input, partitions the rows by non-anomalous ASU key (backends/rank_partition.py)
and materialises the columns that data preparation reads, for its own rows only. Each rank
reports its peak RSS (VmHWM) before the partition (imports, experiments, the table's header:
the per-process floor), after the partition, and after the columns; the partition's time;
and the bytes of the columns it holds. What this measures is the read stage alone: the
stages after it are not yet rank-local (README, "Running under MPI").
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
# What data preparation and the physical model read of each row (those present are used).
PREPARATION_COLUMNS = (
    "miller_index", "id", "flags", "intensity.prf.value", "intensity.prf.variance",
    "intensity.sum.value", "intensity.sum.variance", "partiality", "partial_id", "lp", "qe",
    "d", "xyzobs.px.value", "s1",
)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rank_mode(expt: str, refl: str, out: str) -> None:
    import dials_vmerge  # noqa: F401  (before numba)
    import numpy as np

    from dials_vmerge.backends import mpi_world
    from dials_vmerge.backends.rank_partition import rank_rows
    from dials_vmerge.geometry import space_group_info
    from dials_vmerge.io.expt import read_experiments
    from dials_vmerge.io.refl import read_reflections

    experiments = read_experiments(expt)
    table = read_reflections(refl)
    n_rows = table.nrows
    import dials_vmerge.merging.groups  # noqa: F401  (cctbx: part of the floor, as in a run)

    n_ranks, rank = mpi_world.n_ranks(), mpi_world.rank()  # MPI's own memory is floor too
    floor = vm_hwm_mib()
    start = time.perf_counter()
    part = rank_rows(table, space_group_info(experiments[0]).group(), n_ranks, rank)
    partition_s = time.perf_counter() - start
    del table
    after_partition = vm_hwm_mib()
    held = 0
    for name in PREPARATION_COLUMNS:
        if name in part.table:
            held += np.asarray(part.table[name]).nbytes
    record = {"rank": rank, "ranks": n_ranks, "input_rows": n_rows,
              "rows_held": int(part.input_rows.size), "blocks": part.partition.n_blocks,
              "partition_s": partition_s, "column_mib_held": held / 2 ** 20,
              "peak_mib_floor": floor, "peak_mib_after_partition": after_partition,
              "peak_mib_after_columns": vm_hwm_mib()}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def run(expt: str, refl: str, ranks) -> list:
    launcher = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ranks:
            out = os.path.join(tmp, f"n{n}")
            command = [sys.executable, os.path.abspath(__file__), "--rank-mode", expt, refl, out]
            if n > 1:
                if launcher is None:
                    raise SystemExit("no mpiexec (pip install 'dials-vmerge[mpi]')")
                command = [launcher, "-n", str(n)] + command
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run(command, check=True, timeout=1800)
            wall = time.perf_counter() - start
            per_rank = [json.load(open(f"{out}.rank{r}.json")) for r in range(n)]
            results.append({"ranks": n, "wall_s": wall, "load_average_before": load,
                            "per_rank": per_rank})
    return results


def table(results) -> str:
    one = next((r for r in results if r["ranks"] == 1), None)
    lines = ["| ranks | rows held per rank | columns held (MiB) | floor (MiB) | peak after columns (MiB) | peak / one-rank peak | partition (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ranks = r["per_rank"]
        peaks = [p["peak_mib_after_columns"] for p in ranks]
        ratio = ("" if one is None else " / ".join(
            f"{p / one['per_rank'][0]['peak_mib_after_columns']:.2f}" for p in peaks))
        def joined(key, form="{:.0f}"):
            return " / ".join(form.format(p[key]) for p in ranks)

        lines.append(f"| {r['ranks']} | {joined('rows_held', '{}')} | {joined('column_mib_held')} | "
                     f"{joined('peak_mib_floor')} | {' / '.join(f'{p:.0f}' for p in peaks)} | "
                     f"{ratio} | {joined('partition_s', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv) -> int:
    if argv and argv[0] == "--rank-mode":
        rank_mode(*argv[1:4])
        return 0
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expt")
    parser.add_argument("refl")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = run(args.expt, args.refl, [int(n) for n in args.ranks.split(",")])
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"input": [args.expt, args.refl], "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
