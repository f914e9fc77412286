"""The rules of the DIALS Gaussian smoother's weights along one axis (dials-scaling.md 4.2),
shared by the models' smoothers (model/smoother.py) and the family kernels that compute the
weights inline (kernels/array_family.py). See model/smoother.py for the facts reproduced.
"""

from __future__ import annotations

import math

from numba import njit

MAX_AVERAGE = 3  # DIALS's default num_average: 3 parameters per axis contribute


@njit(cache=True)
def iround(v):
    """Boost iround: round half away from zero."""
    if v >= 0.0:
        t = math.ceil(v)
        if t - v > 0.5:
            t -= 1.0
        return int(t)
    t = math.ceil(-v)
    if t + v > 0.5:
        t -= 1.0
    return -int(t)


@njit(cache=True)
def index_range(z, n_values, n_average):
    """First and one-past-last contributing parameter along one axis."""
    if n_values <= 3:
        return 0, n_values
    i1 = iround(z - n_average / 2.0) + 1
    i2 = i1 + n_average
    if i1 < 0:
        i1 = 0
        i2 = max(2, i2)
    if i2 > n_values:
        i2 = n_values
        i1 = min(i1, n_values - 2)
    return i1, i2


@njit(cache=True)
def position(i, n_values):
    if n_values < 4:
        return float(i)
    return i - 0.5


@njit(cache=True)
def sigma_of(min_n_average):
    return 0.65 + 0.05 * (min_n_average - 2)


@njit(cache=True)
def normalise_row(values, r, n_used, total):
    """Divide the first n_used weights of row r by their sum (rows of zero weight stay 0)."""
    if total > 0.0:
        for s in range(n_used):
            values[r, s] /= total
