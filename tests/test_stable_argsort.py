"""kernels.stable_argsort (LSD radix) gives numpy's stable argsort permutation exactly, on the
cases where the bit-pattern keys could differ from numpy's comparison: ties, signed zeros,
NaNs, infinities, subnormals, constant digits (skipped passes) and negative numbers."""

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba)
from dials_vmerge.kernels.stable_argsort import RADIX_MIN_VALUES, stable_argsort


def _cases():
    rng = np.random.default_rng(7)
    n = RADIX_MIN_VALUES * 3 + 11
    mixed = rng.normal(size=n) * 1e3
    mixed[::7] = np.round(mixed[::7])  # ties
    mixed[::11] = 0.0
    mixed[::13] = -0.0  # equal to +0.0: input order kept
    mixed[::17] = np.nan
    mixed[::18] = -np.nan  # sign bit set: still after +inf
    mixed[::19] = np.inf
    mixed[::23] = -np.inf
    mixed[::29] = 5e-324
    mixed[::31] = -5e-324
    yield "mixed", mixed
    yield "few distinct", rng.integers(-3, 4, size=n).astype(np.float64)
    yield "constant", np.full(n, 2.5)
    yield "sorted", np.arange(n, dtype=np.float64)
    yield "reversed", -np.arange(n, dtype=np.float64)
    yield "same exponent", 1.0 + rng.random(n) * 1e-9  # high digits all equal
    yield "wide range", rng.normal(size=n) * 10.0 ** rng.integers(-300, 300, size=n)
    yield "small", rng.normal(size=100)  # numpy's path
    yield "empty", np.zeros(0)


@pytest.mark.parametrize("name,values", list(_cases()))
def test_radix_argsort_is_numpys_stable_argsort(name, values):
    expected = np.argsort(values, kind="stable")
    got = stable_argsort(values)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected, err_msg=name)


def test_non_contiguous_and_float32_input():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(RADIX_MIN_VALUES * 2, 2))[:, 1]
    np.testing.assert_array_equal(stable_argsort(values), np.argsort(values, kind="stable"))
    single = values.astype(np.float32)
    np.testing.assert_array_equal(stable_argsort(single),
                                  np.argsort(single.astype(np.float64), kind="stable"))
