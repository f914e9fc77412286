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
