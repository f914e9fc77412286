"""io/rank_local_refl.write_rank_local_reflections on a synthetic table, for
tests/test_mpi_rank_local_outputs.py: `mpiexec -n N python rank_local_write_driver.py OUT_DIR
CASE RESULTS_DIR`. Every rank builds the same table (every DIALS column type but Shoebox and string,
random values, a seeded rng), takes its rows and writes; rank 0 checks the file against
io.refl.encode_reflections of the whole table. Each rank writes one line to
RESULTS_DIR/rank<r>.txt (the launcher may join the ranks' stdout lines): "ok <rows held>" or
"error: <message>".

Cases: random (rows dealt to ranks at random: the file interleaves all ranks, keys with
gaps, 7-row windows), empty (no row at all), one_rank (every row on the last rank), unsorted
(the last rank's keys not ascending), duplicate (two ranks share a key)."""

import os
import sys

import numpy as np

import dials_vmerge  # noqa: F401
from dials_vmerge.backends import mpi_world
from dials_vmerge.errors import VmergeError
from dials_vmerge.io.rank_local_refl import write_rank_local_reflections
from dials_vmerge.io.refl import encode_reflections
from dials_vmerge.table import COLUMN_TYPES, ReflectionTable


def synthetic(n_rows, rng):
    table = ReflectionTable(n_rows, {0: "a-b", 3: "c-d"})
    for i, (type_name, (dtype, shape)) in enumerate(sorted(COLUMN_TYPES.items())):
        if dtype is None:
            continue
        size = (n_rows,) + shape
        if type_name == "bool":
            values = rng.random(size) < 0.5
        elif dtype.kind == "f":
            values = rng.normal(size=size)
        else:
            values = rng.integers(0, 1000, size=size).astype(dtype)
        table.set_column(f"c{i}_{type_name}", values, type_name)
    return table


def main():
    out_dir, case, results = sys.argv[1:4]
    n, me = mpi_world.n_ranks(), mpi_world.rank()
    rng = np.random.default_rng(11)
    table = synthetic(0 if case == "empty" else 101, rng)
    if case == "one_rank":
        owner = np.full(table.nrows, n - 1)
    else:
        owner = rng.integers(0, n, size=table.nrows)
    rows = np.flatnonzero(owner == me)
    own = table.select(rows)
    keys = 5 * rows + 2  # gaps between the keys: only their order matters
    if case == "unsorted" and me == n - 1 and keys.size > 1:
        keys = keys[::-1].copy()
    if case == "duplicate" and me == 1 and keys.size:
        keys[0] = 5 * np.flatnonzero(owner == 0)[0] + 2
    own.output_order_key = keys
    path = os.path.join(out_dir, "out.refl")
    try:
        write_rank_local_reflections(own, path, window_rows=7)
    except VmergeError as e:
        report(results, me, f"error: {e}")
        return 0
    if me == 0:
        with open(path, "rb") as f:
            assert f.read() == encode_reflections(table), "file differs from one process"
    report(results, me, f"ok {own.nrows}")
    return 0


def report(results, rank, line):
    with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
