"""dials.vmerge's steps after scaling on a rank-local scaled table (issue 11), for
tests/test_mpi_rank_local_outputs.py and benchmarks: run as
`mpiexec -n N python rank_local_outputs_driver.py <dials.vmerge arguments>` with
RANK_LOCAL_REFERENCE the directory of a one-process dials.vmerge run.

The scaling job is replaced by what a rank-local job returns (backends/rank_local.py's
contract): each rank's rows of the reference run's scaled.refl (rank_partition.rank_rows:
whole non-anomalous ASU groups of a key range, in file order) with `output_order_key` = their
row numbers in that file (ascending on each rank; merged over ranks: the file's order), the
reference's experiments and its JSON's scaling summary. Everything after it (writing
scaled.refl, merging, statistics, the report, merged.mtz) is the real program.

Environment: RANK_LOCAL_WINDOW_ROWS (io/rank_local_refl.WINDOW_ROWS, to cut small files into
several windows), RANK_LOCAL_FAIL_RANK (that rank raises while writing scaled.refl),
RANK_LOCAL_ALL_ON_RANK (that rank holds every row, the others none), RANK_LOCAL_EVEN_KEYS
(the rows cut by equal numbers of distinct keys instead of the key blocks),
RANK_LOCAL_PEAK_DIR (each rank writes its peak RSS there at exit: benchmarks; with
RANK_LOCAL_PEAK_STACK=1 also where its sampled RSS peaked).
"""

import json
import os
import sys

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge import geometry
from dials_vmerge.backends import mpi_world, rank_partition
from dials_vmerge.command_line import vmerge
from dials_vmerge.errors import VmergeError
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.io import rank_local_refl

REFERENCE = os.environ["RANK_LOCAL_REFERENCE"]


def rank_local_job(params, experiments, table, log):
    experiments = read_experiments(os.path.join(REFERENCE, "scaled.expt"))
    scaled = read_reflections(os.path.join(REFERENCE, "scaled.refl"))
    n, me = mpi_world.n_ranks(), mpi_world.rank()
    holder = os.environ.get("RANK_LOCAL_ALL_ON_RANK")
    if holder is not None:
        rows = np.arange(scaled.nrows if me == int(holder) else 0, dtype=np.int64)
        own = scaled.select(rows)
    elif os.environ.get("RANK_LOCAL_EVEN_KEYS"):
        # finer than the read-time key blocks (a small file is one block, all on one rank):
        # the distinct non-anomalous keys cut into N ranges of equal numbers of keys
        space_group = geometry.space_group(experiments[0])
        keys = np.concatenate([k for _, k in rank_partition._key_chunks(
            scaled, space_group, rank_partition.PARTITION_CHUNK_ROWS)])
        distinct = np.unique(keys)
        cuts = [distinct[distinct.size * r // n] if distinct.size * r // n < distinct.size
                else np.iinfo(np.int64).max for r in range(n)] + [np.iinfo(np.int64).max]
        rows = np.flatnonzero((keys >= cuts[me]) & (keys < cuts[me + 1])).astype(np.int64)
        own = scaled.select(rows)
    else:
        part = rank_partition.rank_rows(scaled, geometry.space_group(experiments[0]), n, me)
        own, rows = part.table, part.input_rows
    own.output_order_key = np.asarray(rows, dtype=np.int64)
    with open(os.path.join(REFERENCE, "dials.vmerge.json")) as f:
        summary = json.load(f)["scaling"]
    return experiments, own, summary


def record_peak(directory):
    """At exit: this rank's peak RSS (VmHWM, kB) into directory/peak_rank<r>_of<N>.txt."""
    import atexit

    sampler = None
    if os.environ.get("RANK_LOCAL_PEAK_STACK"):
        # benchmarks/mpi_rank.py's sampler: where this rank's RSS peaked
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
        from mpi_rank import PeakSampler

        sampler = PeakSampler()

    def write():
        with open("/proc/self/status") as f:
            peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        name = f"peak_rank{mpi_world.rank()}_of{mpi_world.n_ranks()}.txt"
        with open(os.path.join(directory, name), "w") as f:
            f.write(peak + "\n")
            if sampler is not None:
                record = sampler.record()
                f.write(f"sampled {record['sampled_peak_mib']:.1f} MiB at\n")
                f.write("\n".join(record["stack_at_peak"]) + "\n")

    atexit.register(write)


def main():
    vmerge.run_scaling_job = rank_local_job
    if os.environ.get("RANK_LOCAL_PEAK_DIR"):
        record_peak(os.environ["RANK_LOCAL_PEAK_DIR"])
    if os.environ.get("RANK_LOCAL_WINDOW_ROWS"):
        rank_local_refl.WINDOW_ROWS = int(os.environ["RANK_LOCAL_WINDOW_ROWS"])
    fail = os.environ.get("RANK_LOCAL_FAIL_RANK")
    if fail is not None and mpi_world.rank() == int(fail):
        real = rank_local_refl._local_rows
        calls = []

        def failing(*args):
            calls.append(1)
            if len(calls) == 3:  # in the third column: the header and two columns are out
                raise VmergeError("injected failure while writing scaled.refl")
            return real(*args)

        rank_local_refl._local_rows = failing
    return vmerge.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
