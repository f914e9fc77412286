"""The derivative expansion's blocks (DERIVATIVE_BLOCK_ROWS rows, scaling/family.py) run the
parallel builds of var(g) and of the smooth-rotation family kernel (issue 10: a 1e6 sweep's
final expansion ran ~60 blocks on one thread); both builds give the same bits, and var(g)
equals diag(J C J^T) computed densely here."""

import numba
import numpy as np

import dials_vmerge  # noqa: F401  (cctbx before numba)
from dials_vmerge.kernels.physical_family import (DERIVATIVE_BLOCK_ROWS,
                                                  smooth_rotation_family_kernel)
from dials_vmerge.scaling.target import variance_of_g_kernel


def test_a_derivative_block_takes_the_parallel_builds():
    block = (np.zeros((DERIVATIVE_BLOCK_ROWS, 4)),)
    expected = numba.get_num_threads() > 1
    assert variance_of_g_kernel.use_parallel(block) == expected
    assert smooth_rotation_family_kernel.use_parallel(block) == expected
    assert not variance_of_g_kernel.use_parallel((np.zeros((DERIVATIVE_BLOCK_ROWS - 1, 4)),))


def test_variance_of_g_builds_agree_with_dense_j_c_jt():
    rng = np.random.default_rng(11)
    n, n_slots, n_par = DERIVATIVE_BLOCK_ROWS, 6, 9
    values = rng.normal(size=(n, n_slots))
    cols = rng.integers(-1, n_par, size=(n, n_slots)).astype(np.int32)
    for row in cols:  # a row's slots name distinct parameters, as the models' ELL rows do
        seen = set()
        for k, c in enumerate(row):
            if c in seen:
                row[k] = -1
            seen.add(int(c))
    a = rng.normal(size=(n_par, n_par))
    covariance = a @ a.T
    out = {}
    for name, build in (("serial", variance_of_g_kernel.serial),
                        ("parallel", variance_of_g_kernel.parallel)):
        out[name] = np.empty(n)
        build(values, cols, covariance, out[name])
    np.testing.assert_array_equal(out["serial"], out["parallel"])
    jacobian = np.zeros((n, n_par))
    for k in range(n_slots):
        ok = cols[:, k] >= 0
        jacobian[np.flatnonzero(ok), cols[ok, k]] += values[ok, k]
    dense = np.einsum("ij,jk,ik->i", jacobian, covariance, jacobian)
    np.testing.assert_allclose(out["parallel"], dense, rtol=1e-10, atol=1e-12)


def _family_inputs(rng, n, n_abs, with_fixed):
    """Random per-row inputs of the smooth-rotation family kernel (record layout of the
    fused physical pass) over n_full parameters, a quarter of them fixed."""
    n_full = 50  # scale 0-11, decay 10-21, absorption 22-45
    record = rng.uniform(0.0, 1.0, size=(n, 8))
    first_param = np.stack([rng.integers(0, 10, n), rng.integers(10, 20, n)], axis=1).astype(
        np.int32)
    absorption = absorption_first = None
    if n_abs:
        absorption = rng.normal(0.0, 0.1, size=(n, n_abs))
        absorption_first = np.full(n, 22, dtype=np.int32)
    fixed = rng.uniform(0.8, 1.2, n) if with_fixed else None
    parameters = rng.uniform(0.5, 1.5, n_full + 2)
    free_col_of_full = np.arange(n_full + 2, dtype=np.int32)
    free_col_of_full[rng.random(n_full + 2) < 0.25] = -1
    free_col_of_full[n_full:] = -1  # guard entries
    # free columns numbered 0.. in order
    free = free_col_of_full >= 0
    free_col_of_full[free] = np.arange(int(free.sum()), dtype=np.int32)
    a = rng.normal(size=(int(free.sum()), int(free.sum())))
    return (record, first_param, absorption, absorption_first, fixed, parameters,
            free_col_of_full), a @ a.T * 1e-3


def test_fused_variance_kernel_equals_the_table_and_dense_j_c_jt():
    """smooth_rotation_family_variance_kernel (each row's derivatives in a scratch row) gives
    the bits of the family kernel's derivative table followed by variance_of_g_kernel, in
    both builds, with and without absorption and a fixed factor; and var(g) = diag(J C J^T)
    computed densely here from the table."""
    from dials_vmerge.kernels.physical_family import smooth_rotation_family_variance_kernel

    rng = np.random.default_rng(7)
    n = DERIVATIVE_BLOCK_ROWS + 1000  # a partial last chunk, both builds by size
    for n_abs, with_fixed in ((24, True), (0, False), (8, False)):
        inputs, covariance = _family_inputs(rng, n, n_abs, with_fixed)
        k = 6 + n_abs
        g_table, values, cols = np.empty(n), np.empty((n, k)), np.empty((n, k), np.int32)
        smooth_rotation_family_kernel(*inputs, g_table, values, cols)
        var_table = np.empty(n)
        variance_of_g_kernel(values, cols, covariance, var_table)
        for build in (smooth_rotation_family_variance_kernel.serial,
                      smooth_rotation_family_variance_kernel.parallel):
            g, var_g = np.empty(n), np.empty(n)
            build(*inputs, covariance, g, var_g)
            np.testing.assert_array_equal(g, g_table)
            np.testing.assert_array_equal(var_g, var_table)
        jacobian = np.zeros((n, covariance.shape[0]))
        for slot in range(k):
            ok = cols[:, slot] >= 0
            jacobian[np.flatnonzero(ok), cols[ok, slot]] += values[ok, slot]
        dense = np.einsum("ij,jk,ik->i", jacobian, covariance, jacobian)
        assert np.all(dense > 0)
        np.testing.assert_allclose(var_g, dense, rtol=1e-10, atol=0)
