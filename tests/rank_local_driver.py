"""Test driver (tests/test_mpi_rank_local_scaling.py): dials.vmerge's scaling job alone, with
the rank-local job switched on (pipeline.RANK_LOCAL_OUTPUT_READY), run as one process or
under mpiexec. Every rank records its log lines and the rows of its scaled table; rank 0
gathers the rows in output_order_key order and saves them, with every rank's log lines and
row count and the scaled models, to the .npz named by RANK_LOCAL_OUT.

    [mpiexec -n N] python rank_local_driver.py expt refl [name=value ...]
"""

import json
import os
import sys

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge import pipeline
from dials_vmerge.backends import mpi_world
from dials_vmerge.cli import Program

PHIL_FILES = ["input", "model", "scaling", "merging", "compute", "output", "cross_validation"]
COLUMNS = ("inverse_scale_factor", "inverse_scale_factor_variance", "intensity.scale.value",
           "intensity.scale.variance", "flags", "original_index", "id")


class RecordingLog:
    """The program's log, with every message this rank logs kept in order."""

    def __init__(self, log):
        self.log, self.lines = log, []

    def info(self, message, *args):
        self.lines.append(str(message))
        self.log.info(message, *args)

    def warning(self, message, *args):
        self.lines.append(str(message))
        self.log.warning(message, *args)


def gather(obj):
    if mpi_world.n_ranks() == 1:
        return [obj]
    from mpi4py import MPI

    return MPI.COMM_WORLD.gather(obj, root=0)


def repeat_when_true(name):
    """Keep jobs whose bool parameter `name` is True off the rank-local path (None: none):
    the repeated path's tests need a stand-in, every real configuration being rank-local
    since session 12."""
    if name:
        from dials_vmerge.model.base import param

        pipeline.RANK_LOCAL_CONDITIONS.append(lambda p: not param(p, name, False))


def run(params, inputs, log):
    pipeline.RANK_LOCAL_OUTPUT_READY = True
    repeat_when_true(os.environ.get("RANK_LOCAL_REPEATED_WHEN_TRUE"))
    recording = RecordingLog(log)
    rows_in = inputs.reflections.nrows
    if os.environ.get("RANK_LOCAL_IN_MEMORY"):
        # an input held in memory (as a multi-file join can be): no lazy column to keep
        # lazy, no file rows to look the partition's keys up by
        table = inputs.reflections
        for name in list(table.keys()):
            table[name] = np.array(table[name])
        assert table.file_rows_of("miller_index", np.arange(2)) is None
    experiments, table, summary = pipeline.run_scaling_job(
        params, inputs.experiments, inputs.reflections, recording)
    key = getattr(table, "output_order_key", None)
    rank_local = key is not None
    if key is None:  # one process: the same key, from the same function
        key = pipeline.output_order_key(experiments, table)
    if key.size and np.any(np.diff(key) <= 0):
        raise AssertionError("output_order_key is not ascending on this rank")
    mine = {name: np.asarray(table.peek(name)) for name in COLUMNS}
    mine["key"] = key
    mine["rank"] = np.full(key.size, mpi_world.rank(), dtype=np.int64)
    everything = gather((mine, recording.lines, rank_local, rows_in))
    if mpi_world.rank() != 0:
        return None
    parts = [p[0] for p in everything]
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(joined["key"], kind="stable")
    out = {name.replace(".", "_"): values[order] for name, values in joined.items()}
    out["rows_per_rank"] = np.array([p["key"].size for p in parts])
    out["input_rows_per_rank"] = np.array([p[3] for p in everything])
    out["rank_local"] = np.array([p[2] for p in everything])
    out["log_lines"] = np.array(json.dumps([p[1] for p in everything]))
    out["models"] = np.array(json.dumps([e.scaling_model for e in experiments]))
    out["identifiers"] = np.array(json.dumps([e.identifier for e in experiments]))
    np.savez(os.environ["RANK_LOCAL_OUT"], **out)
    return None


main = Program(name="rank_local_driver", phil_files=PHIL_FILES, run=run, help="").main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
