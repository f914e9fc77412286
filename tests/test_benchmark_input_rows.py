"""The harness maps per-dataset original_index values back to rows of the simulated input."""

import importlib.util
import os

import numpy as np

from dials_vmerge.table import ReflectionTable

HERE = os.path.dirname(os.path.abspath(__file__))


def _harness():
    spec = importlib.util.spec_from_file_location(
        "bench_run", os.path.join(HERE, "..", "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_original_index_is_mapped_through_the_rows_of_each_dataset():
    input_ids = np.array([0, 1, 0, 1, 1, 0], dtype=np.int32)  # input rows 0..5
    scaled = ReflectionTable(4)
    scaled["id"] = np.array([0, 0, 1, 1], dtype=np.int32)
    scaled["original_index"] = np.array([0, 2, 1, 2], dtype=np.uint64)
    rows = _harness().input_rows(scaled, input_ids)
    # dataset 0 rows are 0, 2, 5; dataset 1 rows are 1, 3, 4
    assert rows.tolist() == [0, 5, 3, 4]
    assert _harness().input_rows(scaled, None).tolist() == [0, 2, 1, 2]
