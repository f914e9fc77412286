"""The device derivations of a round's minimisation table (kernels/cuda/resident_rows.py)
against the host's own arrays, under the CUDA simulator: the subset's rows and group offsets
against scaling.ih_table.GroupLayout.subset, the gradient's column entries against
an independent numpy construction and the host's counting sort (kernels.cuda.target
.column_entries), both plans (one pass per segment; the radix sort that the shapes with few
segments and many columns take, forced on tiny layouts by lowered thresholds), the ELL
columns of the KB, physical and array layouts against the host builders. Run in a subprocess (the simulator
must be on before numba.cuda is imported); every assertion is made here."""

import json
import os
import subprocess
import sys

SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")

SCRIPT = r"""
import json, sys
import dials_vmerge
import numpy as np
from numba import cuda
from dials_vmerge.backends.cuda_target import segment_bounds
from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.kernels.cuda import resident_rows as rr
from dials_vmerge.kernels.cuda.launch import THREADS_PER_BLOCK, blocks
from dials_vmerge.kernels.cuda.target import column_entries
from dials_vmerge.scaling.ih_table import GroupLayout

out = {}
rng = np.random.default_rng(11)
# subsets: several datasets (one empty), whole groups dropped, nothing kept, all kept
for name, sizes, share in (("three", [300, 0, 250], 0.6), ("one", [900], 0.9),
                           ("none", [40, 30], 0.0), ("all", [70, 50], 1.0)):
    asu = [rng.integers(0, 7, size=(n, 3)).astype(np.int32) for n in sizes]
    layout = GroupLayout(asu)
    masks = [rng.random(n) < share for n in sizes]
    sub = layout.subset(masks)
    keep = np.concatenate(masks).astype(np.uint8)
    order, gs, n_rows, n_groups = rr.subset_table(
        cuda.to_device(keep), cuda.to_device(np.asarray(layout.order, np.int64)),
        cuda.to_device(np.asarray(layout.group_start, np.int64)))
    out[name] = {"rows": [n_rows, int(sub.order.size)],
                 "groups": [n_groups, int(sub.group_start.size - 1)],
                 "order": bool(np.array_equal(order.copy_to_host()[:n_rows], sub.order)),
                 "group_start": bool(np.array_equal(gs.copy_to_host(), sub.group_start)),
                 "dropped_groups": int(layout.group_start.size - sub.group_start.size)}
# column entries against an independent numpy construction (a stable argsort by column,
# each segment's first entry by searchsorted) and the host's counting sort
def numpy_entries(cols, n_params, bounds):
    keys = cols.reshape(-1).astype(np.int64)
    used = np.flatnonzero(keys >= 0)
    flat = used[np.argsort(keys[used], kind="stable")]
    sorted_keys = keys[flat]
    offset = np.empty((n_params, bounds.size), np.int64)
    for c in range(n_params):
        lo, hi = np.searchsorted(sorted_keys, [c, c + 1])
        offset[c] = lo + np.searchsorted(flat[lo:hi], bounds * cols.shape[1])
    return flat, offset


def entries_case(cols, n_params, n_segments):
    bounds = np.arange(n_segments + 1, dtype=np.int64) * cols.shape[0] // n_segments
    flat, offset = numpy_entries(cols, n_params, bounds)
    flat_h, offset_h = column_entries(cols, n_params, bounds)
    flat_d, offset_d = rr.column_entries_on_device(cuda.to_device(cols), n_params,
                                                   n_segments)
    return [bool(np.array_equal(offset_d.copy_to_host(), offset)),
            bool(np.array_equal(flat_d.copy_to_host()[:flat.size], flat)),
            bool(np.array_equal(flat_h, flat) and np.array_equal(offset_h, offset)),
            int(flat.size), rr.entry_plan(cols.shape[0], cols.shape[1], n_params,
                                          n_segments)]


# unused slots (-1), columns no row uses, 1 to many segments: the one-pass plan
cols = rng.integers(-1, 9, size=(700, 3)).astype(np.int32)
cols[cols == 4] = -1
entries = []
for chunk_rows in (256, 16):  # one fine chunk per segment, and many (uneven ones)
    rr.ENTRY_CHUNK_ROWS = chunk_rows
    for n_params in (9, 12):
        for n_segments in (1, 2, 5, 64):
            entries.append(entries_case(cols, n_params, n_segments))
out["entries"] = entries
rr.ENTRY_CHUNK_ROWS = 256
# the shapes a run used to take from the host (one segment, a count table over budget or
# a thread's share too long): at the real thresholds a radix plan; here the thresholds are
# lowered so that tiny layouts take it (1 to 5 passes, int32 and int64 columns, columns
# past the used ones, every slot unused)
out["radix_plans"] = [rr.entry_plan(10_000_000, 2, 80_000, 1),
                      rr.entry_plan(700, 3, 1 << 24, 1)]
budget, serial = rr.ENTRY_COUNT_BUDGET, rr.MAX_SERIAL_SLOTS
rr.ENTRY_COUNT_BUDGET, rr.MAX_SERIAL_SLOTS = 64, 256
wide = rng.integers(-1, 70, size=(700, 3)).astype(np.int32)
radix = [entries_case(wide, n_params, n_segments)
         for n_params in (70, 1000) for n_segments in (1, 3)]
radix.append(entries_case(cols.astype(np.int64), 12, 7))
rr.ENTRY_COUNT_BUDGET, rr.MAX_SERIAL_SLOTS = 1 << 12, 1 << 10
# one pass (the whole column the digit): 70 columns x 64 segments over the count budget
radix.append(entries_case(wide, 70, 64))
radix.append(entries_case(np.full((50, 2), -1, np.int32), 70, 64))
out["radix"] = radix
rr.ENTRY_COUNT_BUDGET, rr.MAX_SERIAL_SLOTS = budget, serial

# the segments the target uses (segment_bounds) are the kernel's s n / S
out["bounds"] = bool(all(np.array_equal(segment_bounds(n, p), np.arange(
    segment_bounds(n, p).size) * n // (segment_bounds(n, p).size - 1))
    for n in (1, 300, 70001) for p in (2, 40, 900)))
# ELL columns from the gathered per-row inputs
n = 500
row_dataset = rng.integers(0, 4, n).astype(np.int64)
scale_col = np.array([0, -1, 2, 3], np.int32)
decay_col = np.array([4, 5, -1, 6], np.int32)
d = cuda.device_array((n, 2), np.int32)
rr.kb_columns_kernel[blocks(n), THREADS_PER_BLOCK](cuda.to_device(row_dataset),
                                                   cuda.to_device(scale_col),
                                                   cuda.to_device(decay_col), d)
out["kb_cols"] = bool(np.array_equal(
    d.copy_to_host(), device_models.kb_family_columns(row_dataset, scale_col, decay_col)))
first = rng.integers(0, 50, size=(n, 2)).astype(np.int32)
absorption_first = rng.integers(0, 50, n).astype(np.int32)
d = cuda.device_array((n, 6 + 5), np.int64)
rr.physical_columns_kernel[blocks(n), THREADS_PER_BLOCK](
    cuda.to_device(first), cuda.to_device(absorption_first), True, d)
host = device_models.physical_columns(first, absorption_first, 5)
out["physical_cols"] = bool(np.array_equal(d.copy_to_host(), host))
column_map = rng.integers(-1, 30, 61).astype(np.int64)
mapped = cuda.device_array(host.shape, np.int64)
rr.map_columns_kernel[blocks(n), THREADS_PER_BLOCK](cuda.to_device(host),
                                                    cuda.to_device(column_map), mapped)
out["map_cols"] = bool(np.array_equal(mapped.copy_to_host(), column_map[host]))
source = rng.normal(size=(40, 3))
order = rng.integers(0, 40, 90).astype(np.int64)
gathered = cuda.device_array((90, 3))
rr.gather_rows_kernel[blocks(90), THREADS_PER_BLOCK](cuda.to_device(source),
                                                     cuda.to_device(order), gathered)
out["gather_rows"] = bool(np.array_equal(gathered.copy_to_host(), source[order]))
values = np.arange(1000, dtype=np.int64) * 3
out["sample"] = bool(np.array_equal(rr.sample(cuda.to_device(values), 64),
                                    values[rr.sample_positions(1000, 64)]))
json.dump(out, open(sys.argv[1], "w"))
"""


def test_device_derivations_equal_host(tmp_path):
    path = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=SIM,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.load(open(path))
    for name in ("three", "one", "none", "all"):
        case = out[name]
        assert case["rows"][0] == case["rows"][1] and case["groups"][0] == case["groups"][1]
        assert case["order"] and case["group_start"], name
    assert out["three"]["dropped_groups"] > 0 and out["none"]["rows"][0] == 0
    for offsets_equal, flat_equal, host_equal, n_entries, plan in out["entries"]:
        assert offsets_equal and flat_equal and host_equal and n_entries > 1000
        assert plan[0] == "segments"
    # several fine chunks per segment were exercised (up to 44 on one segment of 700 rows)
    assert max(e[4][1] for e in out["entries"]) >= 40
    # 1e7 observations of 4e4 KB stills in one segment: two passes of 9 bits
    assert out["radix_plans"] == [["radix", 9, 2, 32768], ["radix", 12, 2, 3]]
    for offsets_equal, flat_equal, host_equal, n_entries, plan in out["radix"]:
        assert offsets_equal and flat_equal and host_equal, plan
        assert plan[0] == "radix"
    passes = [e[4][2] for e in out["radix"]]
    assert min(passes) == 1 and max(passes) >= 4
    assert out["radix"][-1][3] == 0 and min(e[3] for e in out["radix"][:-1]) > 1000
    assert out["bounds"]
    for key in ("kb_cols", "physical_cols", "map_cols", "gather_rows", "sample"):
        assert out[key], key
