"""The device derivations of a round's minimisation table (kernels/cuda/resident_rows.py)
against the host's own arrays, under the CUDA simulator: the subset's rows and group offsets
against scaling.ih_table.GroupLayout.subset, the gradient's column entries against
kernels.cuda.target.column_entries (several segment counts), the ELL columns of the KB,
physical and array layouts against the host builders. Run in a subprocess (the simulator
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
# column entries: unused slots (-1), columns no row uses, 1 to many segments
cols = rng.integers(-1, 9, size=(700, 3)).astype(np.int32)
cols[cols == 4] = -1
entries = []
for chunk_rows in (256, 16):  # one fine chunk per segment, and many (uneven ones)
    rr.ENTRY_CHUNK_ROWS = chunk_rows
    for n_params in (9, 12):
        for n_segments in (1, 2, 5, 64):
            bounds = np.arange(n_segments + 1, dtype=np.int64) * cols.shape[0] // n_segments
            flat, offset = column_entries(cols, n_params, bounds)
            flat_d, offset_d = rr.column_entries_on_device(cuda.to_device(cols), n_params,
                                                           n_segments)
            entries.append([bool(np.array_equal(offset_d.copy_to_host(), offset)),
                            bool(np.array_equal(flat_d.copy_to_host(), flat)),
                            int(flat.size),
                            rr.entry_chunking(cols.shape[0], 3, n_params, n_segments)])
out["entries"] = entries
# a shape too serial for the device (one segment, a count table over budget): declined
rr.ENTRY_CHUNK_ROWS = 256
out["declined"] = [rr.entry_chunking(10_000_000, 2, 80_000, 1),
                   rr.entry_chunking(700, 3, 1 << 24, 1),
                   rr.column_entries_on_device(cuda.to_device(cols), 70_000, 1)]

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
    for offsets_equal, flat_equal, n_entries, per_segment in out["entries"]:
        assert offsets_equal and flat_equal and n_entries > 1000
    # several fine chunks per segment were exercised (up to 44 on one segment of 700 rows)
    assert max(e[3] for e in out["entries"]) >= 40
    assert out["declined"] == [None, None, None]
    assert out["bounds"]
    for key in ("kb_cols", "physical_cols", "map_cols", "gather_rows", "sample"):
        assert out[key], key
