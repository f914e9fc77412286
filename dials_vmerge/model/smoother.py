"""The DIALS Gaussian smoother in 1, 2 and 3 dimensions (dials-scaling.md 4.2, 4.3).

A smoother holds N parameter values at fixed positions along each axis. The value at a
normalised coordinate z is the Gaussian-weighted mean of the (at most 3 per axis) nearest
parameters, so the weights depend only on the coordinates, never on the parameters. A
configured smoother keeps only the coordinates and computes the weights of the rows asked
for, already divided by their sum, in ELL form:

    deriv_values (n, k) float64: w_i / sum(w)   (the derivative of the value w.r.t. p_i)
    deriv_index  (n, k) int32:   which parameter each weight belongs to

with k = 3 (1D), 9 (2D), 27 (3D); unused slots have index 0 and value 0. The smoothed value
is then sum_j deriv_values[:, j] * p[deriv_index[:, j]] (`ell_values`).

Facts reproduced here: N = 2, 3 or n_intervals + 2; positions 0..N-1 when N < 4, otherwise
i - 0.5; n_avg = min(3, N) per axis and sigma = 0.65 + 0.05 (min n_avg - 2); neighbourhood
chosen with Boost `iround` (half away from zero); weights exp(-(dz/sigma)^2), no factor 1/2.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..kernels.size_dispatch import parallel_when_large
from ..kernels.smoother_weights import (MAX_AVERAGE, index_range, normalise_row, position,
                                        sigma_of)


def n_values_from_intervals(n_intervals: int) -> int:
    """Number of smoother parameters for a number of sample intervals."""
    if n_intervals < 1:
        raise ValueError("a smoother needs at least one interval")
    if n_intervals == 1:
        return 2
    if n_intervals == 2:
        return 3
    return n_intervals + 2


def n_intervals_from_values(n_values: int) -> int:
    """Inverse of `n_values_from_intervals` (DIALS SmoothMixin.nparam_to_val)."""
    if n_values < 2:
        raise ValueError("a smoother needs at least two parameters")
    if n_values in (2, 3):
        return n_values - 1
    return n_values - 2


def initialise_smooth_input(osc_range_deg, osc_width_deg: float, interval_deg: float):
    """(n_parameters, norm_fac, actual spacing in degrees) for a rotation-axis smoother.

    `osc_range_deg` is the (start, end) rotation range in degrees, `osc_width_deg` the width of
    one image and `interval_deg` the requested maximum spacing of the parameters. The
    normalised coordinate of a reflection is z_obs (image-array units) * norm_fac.
    """
    interval_deg = interval_deg + 0.00001  # DIALS: keeps an exact multiple on the smaller N
    span_deg = osc_range_deg[1] - osc_range_deg[0]
    if span_deg < 2.0 * interval_deg:
        if span_deg <= interval_deg:
            spacing_deg = span_deg
            n_param = 2
        else:
            spacing_deg = span_deg / 2.0
            n_param = 3
    else:
        n_bins = max(int(span_deg / interval_deg) + 1, 3)
        spacing_deg = span_deg / float(n_bins)
        n_param = n_bins + 2
    # 0.999 keeps the last observation strictly inside the smoother range
    norm_fac = 0.999 * osc_width_deg / spacing_deg
    return n_param, norm_fac, spacing_deg


def calc_n_param_from_bins(value_min: float, value_max: float, n_bins: int):
    """(n_parameters, bin width) for a smoother over [value_min, value_max] in n_bins bins."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    bin_width = (value_max - value_min) / n_bins
    return n_values_from_intervals(int(n_bins)), bin_width


def smoother_coordinates(normalised_x: np.ndarray, n_values: int) -> np.ndarray:
    """Smoother-internal coordinates z for one axis, as DIALS sets up a component.

    The data are shifted so that their minimum is 0, the range is
    [floor(round(min, 10)), max(ceil(round(max, 10)), 1)] and the spacing is
    range / n_intervals; z = (x - x0) / spacing.
    """
    from ..backends import rank_local

    x = np.asarray(normalised_x, dtype=np.float64)
    if rank_local.active():
        # a rank-local job (issue 11): the range of every rank's rows of the dataset. The
        # shift is monotone in each value, so min/max of the shifted values are the shifted
        # global min/max, with the bits of one process.
        low = rank_local.minimum(float(x.min()) if x.size else np.inf)
        high = rank_local.maximum(float(x.max()) if x.size else -np.inf)
        if x.size == 0 or not np.isfinite(low):
            return x.copy()
        x = x - low
        x0 = float(math.floor(round(float(low - low), 10)))
        x1 = float(max(math.ceil(round(float(high - low), 10)), 1))
        spacing = (x1 - x0) / float(n_intervals_from_values(n_values))
        return (x - x0) / spacing
    if x.size == 0:
        return x.copy()
    x = x - x.min()
    x0 = float(math.floor(round(float(x.min()), 10)))
    x1 = float(max(math.ceil(round(float(x.max()), 10)), 1))
    spacing = (x1 - x0) / float(n_intervals_from_values(n_values))
    return (x - x0) / spacing


@parallel_when_large
def smoother_weights_1d(z, n_values):
    """Normalised weights (n, 3) and parameter indices (n, 3) of a 1D smoother."""
    n = z.shape[0]
    values = np.zeros((n, 3), dtype=np.float64)
    index = np.zeros((n, 3), dtype=np.int32)
    n_avg = min(MAX_AVERAGE, n_values)
    sigma = sigma_of(n_avg)
    for r in prange(n):
        i1, i2 = index_range(z[r], n_values, n_avg)
        total = 0.0
        slot = np.int64(0)  # not Literal[int](0), which compiles normalise_row twice
        for i in range(i1, i2):
            ds = (z[r] - position(i, n_values)) / sigma
            w = math.exp(-ds * ds)
            values[r, slot] = w
            index[r, slot] = i
            total += w
            slot += 1
        normalise_row(values, r, slot, total)
    return values, index


@parallel_when_large
def smoother_weights_2d(z1, z2, n1, n2):
    """Normalised weights (n, 9) and indices (n, 9) of a 2D smoother; idx = i + j*n1."""
    n = z1.shape[0]
    values = np.zeros((n, 9), dtype=np.float64)
    index = np.zeros((n, 9), dtype=np.int32)
    a1 = min(MAX_AVERAGE, n1)
    a2 = min(MAX_AVERAGE, n2)
    sigma = sigma_of(min(a1, a2))
    for r in prange(n):
        i1, i2 = index_range(z1[r], n1, a1)
        j1, j2 = index_range(z2[r], n2, a2)
        total = 0.0
        slot = np.int64(0)  # not Literal[int](0), which compiles normalise_row twice
        for i in range(i1, i2):
            d1 = z1[r] - position(i, n1)
            for j in range(j1, j2):
                d2 = z2[r] - position(j, n2)
                w = math.exp(-(d1 * d1 + d2 * d2) / (sigma * sigma))
                values[r, slot] = w
                index[r, slot] = i + j * n1
                total += w
                slot += 1
        normalise_row(values, r, slot, total)
    return values, index


@parallel_when_large
def smoother_weights_3d(z1, z2, z3, n1, n2, n3):
    """Normalised weights (n, 27) and indices (n, 27) of a 3D smoother; idx = i + j*n1 + k*n1*n2."""
    n = z1.shape[0]
    values = np.zeros((n, 27), dtype=np.float64)
    index = np.zeros((n, 27), dtype=np.int32)
    a1 = min(MAX_AVERAGE, n1)
    a2 = min(MAX_AVERAGE, n2)
    a3 = min(MAX_AVERAGE, n3)
    sigma = sigma_of(min(a1, min(a2, a3)))
    for r in prange(n):
        i1, i2 = index_range(z1[r], n1, a1)
        j1, j2 = index_range(z2[r], n2, a2)
        k1, k2 = index_range(z3[r], n3, a3)
        total = 0.0
        slot = np.int64(0)  # not Literal[int](0), which compiles normalise_row twice
        for i in range(i1, i2):
            d1 = z1[r] - position(i, n1)
            for j in range(j1, j2):
                d2 = z2[r] - position(j, n2)
                for k in range(k1, k2):
                    d3 = z3[r] - position(k, n3)
                    w = math.exp(-(d1 * d1 + d2 * d2 + d3 * d3) / (sigma * sigma))
                    values[r, slot] = w
                    index[r, slot] = i + j * n1 + k * n1 * n2
                    total += w
                    slot += 1
        normalise_row(values, r, slot, total)
    return values, index


@parallel_when_large
def ell_values(deriv_values, deriv_index, parameters):
    """Row-wise sum_j deriv_values[r, j] * parameters[deriv_index[r, j]]."""
    n, k = deriv_values.shape
    out = np.empty(n, dtype=np.float64)
    for r in prange(n):
        acc = 0.0
        for j in range(k):
            acc += deriv_values[r, j] * parameters[deriv_index[r, j]]
        out[r] = acc
    return out


# Rows per block when a whole configured set is evaluated: the ELL table of one block is
# a transient of ~36 B (1D) to ~324 B (3D) per row, never one of all observations.
ELL_BLOCK_ROWS = 65536


class _ConfiguredSmoother:
    """The smoother coordinates of a set of observations (8 B per observation and axis).

    The ELL weights depend only on the coordinates, so they are recomputed for the rows
    asked for (`ell`) instead of being stored: a stored table would cost 36 B (1D), 108 B
    (2D) or 324 B (3D) per observation for the whole run.
    """

    coordinates: tuple
    n_rows: int

    def _ell_of(self, coordinates):
        raise NotImplementedError

    def ell(self, rows=None):
        """(weights (n, k) float64, parameter index (n, k) int32) of all rows or `rows`
        (an integer index array or a slice)."""
        coordinates = self.coordinates if rows is None else tuple(
            np.ascontiguousarray(z[rows]) for z in self.coordinates)
        return self._ell_of(coordinates)

    @property
    def weights(self):
        return self.ell()[0]

    @property
    def index(self):
        return self.ell()[1]

    def value(self, parameters, rows=None):
        """The smoothed value of each row, block by block."""
        parameters = np.asarray(parameters, dtype=np.float64)
        return self.map_blocks(lambda weights, index, block: ell_values(weights, index,
                                                                        parameters), rows)

    def map_blocks(self, function, rows=None):
        """Concatenated function(weights, index, block) over blocks of the rows, where
        block is the slice (or row array) of the configured rows the ELL table covers."""
        if rows is not None:
            rows = np.asarray(rows)
            n = rows.size
        else:
            n = self.n_rows
        parts = []
        for start in range(0, n, ELL_BLOCK_ROWS):
            block = slice(start, min(n, start + ELL_BLOCK_ROWS))
            block_rows = block if rows is None else rows[block]
            weights, index = self.ell(block_rows)
            parts.append(function(weights, index, block_rows))
        if not parts:
            return np.zeros(0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Smoother1D(_ConfiguredSmoother):
    """A configured 1D smoother."""

    def __init__(self, normalised_x, n_values: int):
        self.n_values = int(n_values)
        self.coordinates = (smoother_coordinates(normalised_x, self.n_values),)
        self.n_rows = int(self.coordinates[0].size)

    def _ell_of(self, coordinates):
        return smoother_weights_1d(coordinates[0], self.n_values)


class Smoother2D(_ConfiguredSmoother):
    """A configured 2D smoother (x fastest in the parameter layout)."""

    def __init__(self, normalised_x, normalised_y, n_x: int, n_y: int):
        self.shape = (int(n_x), int(n_y))
        self.coordinates = (smoother_coordinates(normalised_x, self.shape[0]),
                            smoother_coordinates(normalised_y, self.shape[1]))
        self.n_rows = int(self.coordinates[0].size)

    def _ell_of(self, coordinates):
        return smoother_weights_2d(*coordinates, *self.shape)


class Smoother3D(_ConfiguredSmoother):
    """A configured 3D smoother (x fastest, then y, then z)."""

    def __init__(self, normalised_x, normalised_y, normalised_z, n_x: int, n_y: int, n_z: int):
        self.shape = (int(n_x), int(n_y), int(n_z))
        self.coordinates = (smoother_coordinates(normalised_x, self.shape[0]),
                            smoother_coordinates(normalised_y, self.shape[1]),
                            smoother_coordinates(normalised_z, self.shape[2]))
        self.n_rows = int(self.coordinates[0].size)

    def _ell_of(self, coordinates):
        return smoother_weights_3d(*coordinates, *self.shape)
