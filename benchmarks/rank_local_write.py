"""Peak memory of writing scaled.refl in a rank-local job (issue 11; benchmark only).

    python benchmarks/rank_local_write.py SCALED.EXPT SCALED.REFL OUT_DIR        # one process
    mpiexec -n 2 python benchmarks/rank_local_write.py SCALED.EXPT SCALED.REFL OUT_DIR

One process: the table read from SCALED.REFL, N ranks: each rank's rows of it
(rank_partition.rank_rows; output_order_key = their row numbers); every column is then moved
to a scratch file column by column (table.spill), as run_scaling_job leaves the scaled table,
and written with io.refl.write_reflections (one process) or
io.rank_local_refl.write_rank_local_reflections (N ranks). Each rank resets its peak RSS (VmHWM,
/proc/self/clear_refs) just before the write and reads it after: the figure is the write's
own peak, against the RSS it started from. Writes OUT_DIR/rank{r}.json; OUT_DIR/scaled.refl
is the written file (compare it with SCALED.REFL: cmp). RANK_LOCAL_WINDOW_ROWS: the window
(default io.rank_local_refl.WINDOW_ROWS).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import dials_vmerge  # noqa: F401
from dials_vmerge import geometry
from dials_vmerge.backends import mpi_world, rank_partition
from dials_vmerge.io import read_experiments, read_reflections, write_reflections
from dials_vmerge.memory import release_free_memory


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def main():
    expt, refl, out_dir = sys.argv[1:4]
    experiments = read_experiments(expt)
    table = read_reflections(refl)
    n, me = mpi_world.n_ranks(), mpi_world.rank()
    if n > 1:
        part = rank_partition.rank_rows(table, geometry.space_group(experiments[0]), n, me)
        del table
        table = part.table
        table.output_order_key = np.asarray(part.input_rows, dtype=np.int64)
        del part
    # as run_scaling_job leaves it: every column in a scratch file of this process's rows
    # (not rows selected from the shared input file, which each rank would read in full)
    for name in table.keys():
        table[name] = table.peek(name)
        table.spill([name])
    release_free_memory()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    path = os.path.join(out_dir, "scaled.refl")
    cpu, wall = time.process_time(), time.perf_counter()
    if n > 1:
        from dials_vmerge.io.rank_local_refl import write_rank_local_reflections

        write_rank_local_reflections(table, path,
                                     int(os.environ.get("RANK_LOCAL_WINDOW_ROWS", 0)) or None)
    else:
        write_reflections(table, path)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    record = {"ranks": n, "rank": me, "window_rows": os.environ.get("RANK_LOCAL_WINDOW_ROWS"), "rows_held": int(table.nrows),
              "rss_before_write_mb": before / 1024, "peak_during_write_mb":
              status_kb("VmHWM") / 1024, "write_cpu_s": cpu, "write_wall_s": wall,
              "load_1min": os.getloadavg()[0]}
    with open(os.path.join(out_dir, f"rank{me}_of{n}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
