"""rank_local.exact_sum (issue 11: the reference scaling's small scale cutoff takes a mean
over rows that MPI ranks share out): the correctly rounded sum, whatever the order of the
terms, checked against math.fsum (Shewchuk's exact summation) and against a Fraction sum."""

import math
from fractions import Fraction

import numpy as np

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge.backends import rank_local


def test_exact_sum_is_the_correctly_rounded_sum_in_any_order():
    rng = np.random.default_rng(11)
    wide = rng.normal(size=20000) * 10.0 ** rng.integers(-40, 40, 20000)
    counts = rng.gamma(2.0, 500.0, 30000)  # intensities: a naive sum rounds differently
    cancelling = np.concatenate([[1e16, 1.0, -1e16, 3.0], rng.normal(size=100)])
    tiny = np.array([5e-324, 5e-324, 2.0 ** -1022, -2.0 ** -1070, 1.0])
    for values in (wide, counts, cancelling, tiny):
        expected = math.fsum(values)
        assert rank_local.exact_sum(values) == expected
        assert rank_local.exact_sum(values[::-1]) == expected
        assert rank_local.exact_sum(rng.permutation(values)) == expected
    # the correctly rounded value itself, from exact rationals
    assert rank_local.exact_sum(cancelling) == float(sum(Fraction(v) for v in cancelling))
    # a case where one pass of float additions is off: this checks the test can fail
    assert np.cumsum(cancelling[:4])[-1] != rank_local.exact_sum(cancelling[:4]) == 4.0
    assert rank_local.exact_sum(np.zeros(0)) == 0.0
    assert rank_local.exact_sum(np.array([1e308, 1e308])) == math.inf
    assert math.isnan(rank_local.exact_sum(np.array([1.0, np.nan])))
