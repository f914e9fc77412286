"""Batch offsets and numbers as DIALS assigns them (dials-formats.md 5.4)."""

import os

import numpy as np

from dials_vmerge.batches import batch_numbers, batch_offsets, calculate_batch_offsets, format_batch_table
from dials_vmerge.io import read_experiments, read_reflections


def test_dials_examples():
    assert calculate_batch_offsets([(1, 1800), (1, 1700)]) == [0, 1900]
    assert calculate_batch_offsets([(1, 10), (1, 10)]) == [0, 100]
    assert calculate_batch_offsets([(0, 0)] * 5) == [1, 101, 201, 301, 401]
    # A range starting right after an accepted one keeps its numbers (asymmetric test).
    assert calculate_batch_offsets([(1, 100), (101, 200)]) == [0, 0]
    # 199 ends in 99: the next epoch skips to 201.
    assert calculate_batch_offsets([(1, 199), (1, 50)]) == [0, 200]
    assert calculate_batch_offsets([(1, 200), (1, 50)]) == [0, 300]


def test_quartz_batches(quartz_dir):
    experiments = read_experiments(os.path.join(quartz_dir, "scaled.expt"))
    t = read_reflections(os.path.join(quartz_dir, "scaled.refl"))
    assert batch_offsets(experiments) == [0]
    b = batch_numbers(t, experiments)
    assert b.min() == 1 and b.max() == 100
    z = t["xyzobs.px.value"][:, 2]
    assert np.array_equal(b, np.floor(z).astype(int) + 1)
    assert "1-100" in format_batch_table(experiments)


def test_batch_numbers_of_unassigned_ids(quartz_dir):
    # rows whose id names no experiment get batch 0, the others floor(z) + 1 + offset; the
    # ids are used as stored (int32), row by row here as the independent reference
    experiments = read_experiments(os.path.join(quartz_dir, "scaled.expt"))
    t = read_reflections(os.path.join(quartz_dir, "scaled.refl"))
    ids = np.array(t["id"])
    ids[::7] = -1
    ids[3::11] = 999
    t["id"] = ids
    b = batch_numbers(t, experiments)
    z = t["xyzobs.px.value"][:, 2]
    expected = [0 if i < 0 or i >= 1 else int(np.floor(zi)) + 1 for i, zi in zip(ids, z)]
    assert b.dtype == np.int64
    assert b.tolist() == expected
    assert (b == 0).sum() == np.count_nonzero((ids < 0) | (ids >= 1))
