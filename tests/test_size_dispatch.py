"""Kernels with a serial and a parallel build (kernels/size_dispatch.py, issue 15 cold
start): small calls run and compile only the serial build, large ones the parallel build,
and the two builds give bit-identical results (chunked kernels, disjoint outputs)."""

import numpy as np
import numba
import pytest

import dials_vmerge  # noqa: F401  (cctbx before numba)
from dials_vmerge.kernels.size_dispatch import (PARALLEL_MIN_ROWS, SERIAL_SUFFIX,
                                                SizeDispatchedKernel, parallel_when_large)
from dials_vmerge.scaling.ih_table import chunk_bounds, merged_intensity_kernel
from dials_vmerge.scaling.target import normal_matrix_kernel


def _grouped_observations(n_groups=400, n_par=12, n_slots=3, seed=5):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_groups)
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(group_start[-1])
    intensity = rng.gamma(2.0, 50.0, n)
    weight = 1.0 / rng.uniform(1.0, 20.0, n) ** 2
    g = rng.uniform(0.5, 2.0, n)
    deriv_values = rng.normal(size=(n, n_slots))
    deriv_col = rng.integers(-1, n_par, size=(n, n_slots)).astype(np.int32)
    return intensity, weight, g, deriv_values, deriv_col, group_start, n_par


def test_merged_intensity_serial_and_parallel_equal_numpy():
    intensity, weight, g, _, _, group_start, _ = _grouped_observations()
    chunks = chunk_bounds(group_start, 4)
    n_groups = group_start.size - 1
    out = {}
    for name, build in (("serial", merged_intensity_kernel.serial),
                        ("parallel", merged_intensity_kernel.parallel)):
        out[name] = np.empty(n_groups)
        build(intensity, weight, g, group_start, chunks, out[name])
    np.testing.assert_array_equal(out["serial"], out["parallel"])
    wg = weight * g
    groups = np.repeat(np.arange(n_groups), np.diff(group_start))
    reference = (np.bincount(groups, wg * intensity, n_groups)
                 / np.bincount(groups, wg * g, n_groups))
    np.testing.assert_allclose(out["serial"], reference, rtol=1e-12)


def test_normal_matrix_serial_and_parallel_are_bit_identical():
    intensity, weight, g, deriv_values, deriv_col, group_start, n_par = _grouped_observations()
    chunks = chunk_bounds(group_start, 4)
    n_chunks = chunks.size - 1
    out = {}
    for name, build in (("serial", normal_matrix_kernel.serial),
                        ("parallel", normal_matrix_kernel.parallel)):
        phi, rhs, normal = (np.zeros(n_chunks), np.zeros((n_chunks, n_par)),
                            np.zeros((n_chunks, n_par, n_par)))
        build(intensity, weight, g, deriv_values, deriv_col, group_start, chunks, phi, rhs,
              normal)
        out[name] = (phi, rhs, normal)
    for serial, parallel in zip(out["serial"], out["parallel"]):
        np.testing.assert_array_equal(serial, parallel)
    # phi = sum w (I - g Ih)^2, recomputed with numpy
    n_groups = group_start.size - 1
    groups = np.repeat(np.arange(n_groups), np.diff(group_start))
    ih = (np.bincount(groups, weight * g * intensity, n_groups)
          / np.bincount(groups, weight * g * g, n_groups))
    phi_reference = np.sum(weight * (intensity - g * ih[groups]) ** 2)
    assert out["serial"][0].sum() == pytest.approx(phi_reference, rel=1e-12)
    assert np.abs(out["serial"][2]).sum() > 0  # the normal matrix was filled


def _fill_rows(values, out):
    for r in numba.prange(values.shape[0]):
        out[r] = 2.0 * values[r]


def test_small_calls_compile_only_the_serial_build():
    kernel = SizeDispatchedKernel(_fill_rows)
    values = np.arange(10.0)
    out = np.empty(10)
    kernel(values, out)
    np.testing.assert_array_equal(out, 2.0 * values)
    assert len(kernel.serial.signatures) == 1 and len(kernel.parallel.signatures) == 0
    # separate cache files: numba names them by qualified name, not by the parallel flag
    assert kernel.serial.py_func.__qualname__ == "_fill_rows" + SERIAL_SUFFIX
    assert kernel.parallel.py_func is _fill_rows
    large = np.empty(PARALLEL_MIN_ROWS)
    assert kernel.use_parallel((large,)) == (numba.get_num_threads() > 1)
    assert not kernel.use_parallel((np.empty(PARALLEL_MIN_ROWS - 1), None, 3))
    assert parallel_when_large(min_rows=7)(_fill_rows).min_rows == 7
