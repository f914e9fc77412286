"""The array-model family (smoothed grids, dials-scaling.md 4.7) of every dataset in one kernel.

    g = D(res, time) * A(x, y, time) * M(x, y) * F

with D, A, M the Gaussian-smoothed grids (decay 2D, absorption 3D, modulation 2D) and F the
fixed (analytical) factor. Per row: its dataset and its smoother-internal coordinates, one
column per axis of each grid the family has (`coordinate_start[c]`: the first column of grid
c). Per dataset and grid: the grid's shape (grid_shape[d, c]; 0 in the first entry: the
dataset's model has no such grid, value 1) and the full-vector index of its first parameter
(grid_first[d, c]; every dataset's parameters concatenated). The weights are computed inline
from the coordinates (kernels/smoother_weights.py, as model/smoother.py computes them), so no
per-row weight table exists.

Output in the ELL form of the scaling target: grid c owns the slots from slot_start[c] (-1:
no dataset of the family has it), 9 (2D) or 27 (3D) wide; each value is the normalised
weight times the product of the other factors, each column the parameter's free column
(free_col_of_full; -1: fixed or unused slot).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .size_dispatch import parallel_when_large
from .smoother_weights import MAX_AVERAGE, index_range, position, sigma_of

N_GRIDS = 3  # decay, absorption, modulation
GRID_AXES = np.array([2, 3, 2], dtype=np.int64)
GRID_SLOTS = np.array([9, 27, 9], dtype=np.int64)


@njit(cache=True)
def _grid_value(coordinates, r, column, n_axes, n1, n2, n3, first, parameters,
                deriv_values, deriv_col, out, slot0, width):
    """One grid at row r: normalised weights into deriv_values[out, slot0:], their full
    parameter indices into deriv_col[out, slot0:] (unused slots: 0 and -1); returns the
    value."""
    z1 = coordinates[r, column]
    z2 = coordinates[r, column + 1]
    a1 = min(MAX_AVERAGE, n1)
    a2 = min(MAX_AVERAGE, n2)
    i1, i2 = index_range(z1, n1, a1)
    j1, j2 = index_range(z2, n2, a2)
    total = 0.0
    slot = 0
    if n_axes == 2:
        sigma = sigma_of(min(a1, a2))
        for i in range(i1, i2):
            d1 = z1 - position(i, n1)
            for j in range(j1, j2):
                d2 = z2 - position(j, n2)
                w = math.exp(-(d1 * d1 + d2 * d2) / (sigma * sigma))
                deriv_values[out, slot0 + slot] = w
                deriv_col[out, slot0 + slot] = first + i + j * n1
                total += w
                slot += 1
    else:
        z3 = coordinates[r, column + 2]
        a3 = min(MAX_AVERAGE, n3)
        k1, k2 = index_range(z3, n3, a3)
        sigma = sigma_of(min(a1, min(a2, a3)))
        for i in range(i1, i2):
            d1 = z1 - position(i, n1)
            for j in range(j1, j2):
                d2 = z2 - position(j, n2)
                for k in range(k1, k2):
                    d3 = z3 - position(k, n3)
                    w = math.exp(-(d1 * d1 + d2 * d2 + d3 * d3) / (sigma * sigma))
                    deriv_values[out, slot0 + slot] = w
                    deriv_col[out, slot0 + slot] = first + i + j * n1 + k * n1 * n2
                    total += w
                    slot += 1
    value = 0.0
    for s in range(slot):
        if total > 0.0:
            deriv_values[out, slot0 + s] /= total
        value += deriv_values[out, slot0 + s] * parameters[deriv_col[out, slot0 + s]]
    for s in range(slot, width):
        deriv_values[out, slot0 + s] = 0.0
        deriv_col[out, slot0 + s] = -1
    return value


@njit(cache=True)
def _row_values(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                slot_start, parameters, r, deriv_values, deriv_col, out, grid_values):
    """Each grid's value at row r into grid_values[c] (1 for a grid the dataset lacks);
    its weights and full indices into row `out` of deriv_values, deriv_col."""
    d = row_dataset[r]
    for c in range(N_GRIDS):
        s0 = slot_start[c]
        if s0 < 0:
            grid_values[c] = 1.0
            continue
        width = GRID_SLOTS[c]
        if grid_shape[d, c, 0] == 0:
            for s in range(width):
                deriv_values[out, s0 + s] = 0.0
                deriv_col[out, s0 + s] = -1
            grid_values[c] = 1.0
            continue
        grid_values[c] = _grid_value(
            coordinates, r, coordinate_start[c], GRID_AXES[c], grid_shape[d, c, 0],
            grid_shape[d, c, 1], grid_shape[d, c, 2], grid_first[d, c], parameters,
            deriv_values, deriv_col, out, s0, width)


CHUNK_ROWS = 4096  # rows per parallel chunk (each chunk has its own small buffers)


@parallel_when_large
def array_family_kernel(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                        slot_start, fixed_factor, parameters, free_col_of_full, g,
                        deriv_values, deriv_col):
    n = row_dataset.shape[0]
    n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
    for chunk in prange(n_chunks):
        grid_values = np.empty(N_GRIDS)
        for r in range(chunk * CHUNK_ROWS, min(n, (chunk + 1) * CHUNK_ROWS)):
            _row_values(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                        slot_start, parameters, r, deriv_values, deriv_col, r, grid_values)
            f = 1.0
            if fixed_factor is not None:
                f = fixed_factor[r]
            # the product in component order, as the models' product rule forms it
            g[r] = grid_values[0] * grid_values[1] * grid_values[2] * f
            for c in range(N_GRIDS):
                s0 = slot_start[c]
                if s0 < 0:
                    continue
                others = 1.0
                for c2 in range(N_GRIDS):
                    if c2 != c:
                        others *= grid_values[c2]
                others *= f
                for s in range(s0, s0 + GRID_SLOTS[c]):
                    deriv_values[r, s] *= others
                    full = deriv_col[r, s]
                    deriv_col[r, s] = free_col_of_full[full] if full >= 0 else -1


@parallel_when_large
def array_family_g_kernel(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                          slot_start, n_slots, fixed_factor, parameters, g):
    n = row_dataset.shape[0]
    n_chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
    for chunk in prange(n_chunks):
        grid_values = np.empty(N_GRIDS)
        weights = np.empty((1, n_slots))  # one row's weights at a time
        full = np.empty((1, n_slots), dtype=np.int32)
        for r in range(chunk * CHUNK_ROWS, min(n, (chunk + 1) * CHUNK_ROWS)):
            _row_values(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                        slot_start, parameters, r, weights, full, 0, grid_values)
            f = 1.0
            if fixed_factor is not None:
                f = fixed_factor[r]
            g[r] = grid_values[0] * grid_values[1] * grid_values[2] * f


def evaluate_array_family(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                          slot_start, n_slots, fixed_factor, parameters, free_col_of_full):
    """(g (n,), deriv_values (n, n_slots), deriv_col (n, n_slots) int32) for every row."""
    n = row_dataset.shape[0]
    g = np.empty(n)
    values = np.empty((n, n_slots))
    cols = np.empty((n, n_slots), dtype=np.int32)
    array_family_kernel(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                        slot_start, fixed_factor, parameters, free_col_of_full, g, values,
                        cols)
    return g, values, cols


def evaluate_array_family_g(row_dataset, coordinates, grid_shape, grid_first,
                            coordinate_start, slot_start, n_slots, fixed_factor, parameters):
    g = np.empty(row_dataset.shape[0])
    array_family_g_kernel(row_dataset, coordinates, grid_shape, grid_first, coordinate_start,
                          slot_start, n_slots, fixed_factor, parameters, g)
    return g
