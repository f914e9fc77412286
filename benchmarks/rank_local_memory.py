"""Per-rank peak RSS of the scaling job alone, rank-local or repeated (issue 11).

    [mpiexec -n N] python benchmarks/rank_local_memory.py OUT MODE expt refl [name=value ...]

MODE: rank_local (pipeline.RANK_LOCAL_OUTPUT_READY switched on, so a supported
configuration runs each rank on its own rows) or repeated (today's path: every rank holds
every row). Writes OUT.rank<r>.json: peak RSS (MiB, ru_maxrss) after reading the inputs and
after the scaling job, the rows the rank scaled, CPU seconds of the job. Benchmark-only.
"""

import json
import resource
import sys
import time

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge import pipeline
from dials_vmerge.backends import mpi_world
from dials_vmerge.cli import Program

PHIL_FILES = ["input", "model", "scaling", "merging", "compute", "output", "cross_validation"]


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    out, mode = sys.argv[1], sys.argv[2]
    pipeline.RANK_LOCAL_OUTPUT_READY = mode == "rank_local"

    def run(params, inputs, log):
        before = peak_mib()
        cpu = time.process_time()
        _, table, _ = pipeline.run_scaling_job(params, inputs.experiments,
                                               inputs.reflections, log)
        record = {"mode": mode, "n_ranks": mpi_world.n_ranks(), "rank": mpi_world.rank(),
                  "peak_mib_after_reading": before, "peak_mib_after_scaling": peak_mib(),
                  "rows_scaled": int(table.nrows),
                  "rank_local": getattr(table, "output_order_key", None) is not None,
                  "job_cpu_s": time.process_time() - cpu}
        with open(f"{out}.rank{mpi_world.rank()}.json", "w") as f:
            json.dump(record, f)

    return Program(name="rank_local_memory", phil_files=PHIL_FILES, run=run, help="").main(
        sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
