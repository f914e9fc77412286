"""Test driver (tests/test_mpi_rank_local_cross_validation.py): dials.vmerge's cross-validation
(its `run`, as the program calls it) as one process or under mpiexec, with recorders around
the functions it calls. Rank 0 saves to the .npz named by CV_OUT:

- every job's work/free statistics as float.hex (the table's numbers in full);
- every rank's log lines;
- per rank: how many times the read-time partition ran (pipeline.rank_local_rows), each
  job's input rows, whether the job was given pre-partitioned rows, and whether the input
  table was still alive while the jobs ran;
- the first job's scaled rows of all ranks in output order (for an independent
  recomputation of its statistics).

    [mpiexec -n N] python cross_validation_driver.py expt refl [name=value ...]
"""

import gc
import json
import os
import sys
import weakref

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge import pipeline
from dials_vmerge.backends import mpi_world
from dials_vmerge.cli import Program
from dials_vmerge.command_line import vmerge
from dials_vmerge.scaling import free_set
from rank_local_driver import RecordingLog, gather, repeat_when_true  # this directory's

COLUMNS = ("miller_index", "inverse_scale_factor", "intensity.scale.value",
           "intensity.scale.variance", "flags")


def run(params, inputs, log):
    recording = RecordingLog(log)
    record = {"partitions": 0, "jobs": [], "results": [], "first_job": None}
    input_table = weakref.ref(inputs.reflections)
    rows_in = inputs.reflections.nrows

    rank_local_rows = pipeline.rank_local_rows

    def counted_rank_local_rows(*args, **kwargs):
        record["partitions"] += 1
        return rank_local_rows(*args, **kwargs)

    run_scaling_job = pipeline.run_scaling_job

    def recorded_job(params, experiments, table, log, rank_rows=None):
        gc.collect()
        record["jobs"].append({"rows": int(table.nrows), "rank_rows": rank_rows is not None,
                               "input_alive": input_table() is not None})
        return run_scaling_job(params, experiments, table, log, rank_rows=rank_rows)

    work_free_statistics = free_set.work_free_statistics

    def recorded_statistics(table, experiments, *args, **kwargs):
        if record["first_job"] is None:
            key = getattr(table, "output_order_key", None)
            if key is None:
                key = pipeline.output_order_key(experiments, table)
            record["first_job"] = {name.replace(".", "_"): np.asarray(table.peek(name))
                                   for name in COLUMNS}
            record["first_job"]["key"] = np.asarray(key)
            record["experiments"] = json.dumps(experiments.to_dict())
        values = work_free_statistics(table, experiments, *args, **kwargs)
        record["results"].append([float(v).hex() for v in values])
        return values

    pipeline.rank_local_rows = counted_rank_local_rows
    pipeline.run_scaling_job = recorded_job
    free_set.work_free_statistics = recorded_statistics
    vmerge.run(params, inputs, recording)
    everything = gather((record, recording.lines, rows_in))
    if mpi_world.rank() != 0:
        return None
    parts = [p[0]["first_job"] for p in everything]
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(joined["key"], kind="stable")
    out = {"first_" + name: values[order] for name, values in joined.items()}
    out["results"] = np.array(json.dumps([p[0]["results"] for p in everything]))
    out["jobs"] = np.array(json.dumps([p[0]["jobs"] for p in everything]))
    out["partitions"] = np.array([p[0]["partitions"] for p in everything])
    out["input_rows"] = np.array([p[2] for p in everything])
    out["log_lines"] = np.array(json.dumps([p[1] for p in everything]))
    out["experiments"] = np.array(everything[0][0]["experiments"])
    np.savez(os.environ["CV_OUT"], **out)
    return None


# The mixed case (one configuration rank-local, one repeated on every rank) needs a stand-in:
# the test names a bool parameter whose True value is kept off the rank-local path.
repeat_when_true(os.environ.get("CV_REPEATED_WHEN_TRUE"))

main = Program(name="cross_validation_driver", phil_files=vmerge.PHIL_FILES, run=run,
               help="").main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
