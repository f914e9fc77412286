"""kernels.permute: an array put into an order in place equals numpy's values[order]."""

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.kernels.permute import permute_in_place


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 65537])
def test_equals_fancy_indexing(n):
    rng = np.random.default_rng(n)
    values = rng.normal(size=n)
    values[::5] = np.nan  # moved as they are
    order = rng.permutation(n)
    expected = values[order]
    out = permute_in_place(values, order)
    assert out is values
    assert np.array_equal(values, expected, equal_nan=True)


def test_identity_and_one_long_cycle():
    values = np.arange(10.0)
    permute_in_place(values, np.arange(10))
    assert values.tolist() == list(range(10))
    cycle = np.roll(np.arange(10), -1)  # new[i] = old[i + 1]
    permute_in_place(values, cycle)
    assert values.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_refuses_what_it_cannot_permute_in_place():
    with pytest.raises(ValueError):
        permute_in_place(np.zeros((3, 2)), np.arange(3))
    with pytest.raises(ValueError):
        permute_in_place(np.zeros(6)[::2], np.arange(3))
