"""Spherical-harmonic absorption surface (DIALS SHScaleComponent, dials-scaling.md 4.6).

g = 1 + sum_lm C_lm * Y'_lm, where each observation's Y'_lm is the average of the real
harmonic at the crystal-frame sample-to-source direction s0c and the crystal-frame unit s1c.

Conventions (each one matters at the 1e-4 level):
* R(phi) = S . Rot(axis, phi) . F with phi from the z of xyzobs.px.value;
  s0c = R^T (sample -> source), s1c = R^T s1/|s1|; rows with |s1| = 0 get zero vectors.
* Both are then turned so that crystal x becomes the polar axis: (x, y, z) -> (-z, y, x).
* theta = atan2(sqrt(x^2 + y^2), z), phi = atan2(y, x).
* Real basis with the Condon-Shortley phase cancelled, l = 1..lmax, m = -l..l:
  m < 0: sqrt2 (-1)^m Im Y_l^|m|;  m = 0: Y_l^0;  m > 0: sqrt2 (-1)^m Re Y_l^m, where Y is the
  complex orthonormal harmonic including the CS phase (scipy.special.sph_harm_y).
* Above 100 000 observations DIALS takes the harmonics from a table on a 0.5 degree grid
  evaluated at the cell centres, indexed by the cell containing (theta, phi + pi).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import njit, prange

from ..kernels.size_dispatch import parallel_when_large
from scipy.special import sph_harm_y

from .component import Component, take_rows

# DIALS (scaling_helper.h) uses this 10-digit value of sqrt(2); we do too, for parity.
SQRT2_DIALS = 1.414213562
LOOKUP_THRESHOLD = 100000  # more observations than this: use the 0.5 degree lookup table
POINTS_PER_DEGREE = 2


def n_sh_parameters(lmax: int) -> int:
    return int(lmax) * (int(lmax) + 2)


# -- crystal-frame directions ---------------------------------------------------------------


@njit(cache=True)
def _crystal_vector(v0, v1, v2, setting, axis, fixed, cos_phi, sin_phi):
    """F^T Rot(axis, phi)^T S^T v, i.e. R^T v with R = S . Rot . F, as three scalars."""
    a0 = setting[0, 0] * v0 + setting[1, 0] * v1 + setting[2, 0] * v2
    a1 = setting[0, 1] * v0 + setting[1, 1] * v1 + setting[2, 1] * v2
    a2 = setting[0, 2] * v0 + setting[1, 2] * v1 + setting[2, 2] * v2
    # Rodrigues rotation by -phi about the unit axis k
    k0, k1, k2 = axis[0], axis[1], axis[2]
    kdota = k0 * a0 + k1 * a1 + k2 * a2
    c0 = k1 * a2 - k2 * a1
    c1 = k2 * a0 - k0 * a2
    c2 = k0 * a1 - k1 * a0
    t = 1.0 - cos_phi
    b0 = a0 * cos_phi - c0 * sin_phi + k0 * kdota * t
    b1 = a1 * cos_phi - c1 * sin_phi + k1 * kdota * t
    b2 = a2 * cos_phi - c2 * sin_phi + k2 * kdota * t
    x = fixed[0, 0] * b0 + fixed[1, 0] * b1 + fixed[2, 0] * b2
    y = fixed[0, 1] * b0 + fixed[1, 1] * b1 + fixed[2, 1] * b2
    z = fixed[0, 2] * b0 + fixed[1, 2] * b1 + fixed[2, 2] * b2
    return x, y, z


@parallel_when_large
def crystal_frame_vectors_kernel(
    z_obs, s1, sample_to_source, setting, axis, fixed, phi0_deg, osc_width_deg, first_image
):
    """s0c, s1c (n, 3) in the DIALS absorption frame (already turned so x is the polar axis)."""
    n = z_obs.shape[0]
    s0c = np.zeros((n, 3))
    s1c = np.zeros((n, 3))
    for r in prange(n):
        length = math.sqrt(s1[r, 0] ** 2 + s1[r, 1] ** 2 + s1[r, 2] ** 2)
        if not length > 0.0:
            continue
        phi = math.radians(phi0_deg + (z_obs[r] - (first_image - 1)) * osc_width_deg)
        cos_phi = math.cos(phi)
        sin_phi = math.sin(phi)
        u = sample_to_source
        x, y, z = _crystal_vector(u[0], u[1], u[2], setting, axis, fixed, cos_phi, sin_phi)
        # +90 degrees about (0, -1, 0): (x, y, z) -> (-z, y, x)
        s0c[r, 0] = -z
        s0c[r, 1] = y
        s0c[r, 2] = x
        x, y, z = _crystal_vector(
            s1[r, 0] / length, s1[r, 1] / length, s1[r, 2] / length,
            setting, axis, fixed, cos_phi, sin_phi,
        )
        s1c[r, 0] = -z
        s1c[r, 1] = y
        s1c[r, 2] = x
    return s0c, s1c


def crystal_frame_vectors(experiment, z_obs, s1):
    """(s0c, s1c) for observations at frame z `z_obs` with diffracted beam vectors `s1`."""
    from .. import geometry

    beam_s0 = np.asarray(geometry.s0(experiment), dtype=np.float64)
    sample_to_source = -beam_s0 / np.linalg.norm(beam_s0)
    axis = np.asarray(geometry.rotation_axis(experiment), dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    phi0_deg, width_deg = geometry.oscillation(experiment)
    first_image = geometry.image_range(experiment)[0]
    return crystal_frame_vectors_kernel(
        np.ascontiguousarray(z_obs, dtype=np.float64),
        np.ascontiguousarray(s1, dtype=np.float64),
        sample_to_source,
        np.ascontiguousarray(geometry.setting_rotation(experiment), dtype=np.float64),
        axis,
        np.ascontiguousarray(geometry.fixed_rotation(experiment), dtype=np.float64),
        float(phi0_deg),
        float(width_deg),
        int(first_image),
    )


def theta_phi(vectors):
    """Polar angle in [0, pi] and azimuth in (-pi, pi] (radians) of each vector."""
    v = np.asarray(vectors, dtype=np.float64)
    theta = np.arctan2(np.sqrt(v[:, 0] ** 2 + v[:, 1] ** 2), v[:, 2])
    phi = np.arctan2(v[:, 1], v[:, 0])
    return theta, phi


# -- real harmonic basis --------------------------------------------------------------------


def real_harmonics(theta, phi, lmax: int) -> np.ndarray:
    """Y'_lm at each direction, shape (n, lmax(lmax+2)), columns l = 1..lmax, m = -l..l."""
    theta = np.asarray(theta, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    out = np.empty((theta.size, n_sh_parameters(lmax)))
    column = 0
    for l in range(1, lmax + 1):
        for m in range(-l, l + 1):
            y = sph_harm_y(l, abs(m), theta, phi)
            if m < 0:
                out[:, column] = SQRT2_DIALS * (-1.0) ** m * y.imag
            elif m == 0:
                out[:, column] = y.real
            else:
                out[:, column] = SQRT2_DIALS * (-1.0) ** m * y.real
            column += 1
    return out


def sph_harm_coefficients(s0c, s1c, lmax: int) -> np.ndarray:
    """Exact per-observation coefficients: (Y'(s0c) + Y'(s1c)) / 2, shape (n, n_par)."""
    t0, p0 = theta_phi(s0c)
    t1, p1 = theta_phi(s1c)
    return 0.5 * (real_harmonics(t0, p0, lmax) + real_harmonics(t1, p1, lmax))


def sph_harm_lookup_table(lmax: int, points_per_degree: int = POINTS_PER_DEGREE) -> np.ndarray:
    """Y'_lm at the centres of a (theta, phi + pi) grid, shape (n_theta * n_phi, n_par).

    One table per (lmax, grid) for the process (50 MB at lmax 4): the arguments are made
    plain ints first, since lru_cache would key 4 and numpy.int64(4) apart."""
    return _sph_harm_lookup_table(int(lmax), int(points_per_degree))


@lru_cache(maxsize=4)
def _sph_harm_lookup_table(lmax: int, points_per_degree: int) -> np.ndarray:
    n_cells = 180 * points_per_degree * 360 * points_per_degree
    table = lookup_table_rows(np.arange(n_cells), lmax, points_per_degree)
    table.flags.writeable = False
    return table


def lookup_table_rows(cells, lmax: int, points_per_degree: int = POINTS_PER_DEGREE):
    """Rows `cells` of sph_harm_lookup_table, computed for those cells only (same values:
    the same arithmetic on the same cell centres)."""
    n_phi = 360 * points_per_degree
    step = math.pi / (180.0 * points_per_degree)
    half_step = math.pi / (360.0 * points_per_degree)
    cells = np.asarray(cells, dtype=np.int64)
    theta = (cells // n_phi) * step + half_step
    phi = (cells % n_phi) * step - math.pi + half_step
    return real_harmonics(theta, phi, int(lmax))


def lookup_index(theta, phi, points_per_degree: int = POINTS_PER_DEGREE) -> np.ndarray:
    """Grid cell (lower corner) of each direction in `sph_harm_lookup_table`."""
    n_phi = 360 * points_per_degree
    n_theta = 180 * points_per_degree
    i_theta = np.floor(np.asarray(theta) * points_per_degree * 180.0 / math.pi).astype(np.int64)
    i_phi = np.floor((np.asarray(phi) + math.pi) * 180.0 * points_per_degree / math.pi).astype(
        np.int64
    )
    # theta = pi or phi = pi would fall one cell past the grid (DIALS reads beyond its table
    # there); keep them in the last cell.
    i_theta = np.clip(i_theta, 0, n_theta - 1)
    i_phi = np.clip(i_phi, 0, n_phi - 1)
    return i_theta * n_phi + i_phi


def sph_harm_coefficients_lookup(s0c, s1c, lmax: int) -> np.ndarray:
    """Per-observation coefficients from the 0.5 degree table (DIALS above 100 000 rows)."""
    table = sph_harm_lookup_table(int(lmax))
    i0 = lookup_index(*theta_phi(s0c))
    i1 = lookup_index(*theta_phi(s1c))
    return (table[i0] + table[i1]) / 2.0


def absorption_coefficients(s0c, s1c, lmax: int) -> np.ndarray:
    """The coefficient table DIALS would use for this many observations."""
    if len(s0c) > LOOKUP_THRESHOLD:
        return sph_harm_coefficients_lookup(s0c, s1c, lmax)
    return sph_harm_coefficients(s0c, s1c, lmax)


def configure_absorption(component, s0c, s1c, n_observations=None) -> None:
    """Configure an SHAbsorption as DIALS would for this many observations (n_observations:
    the dataset's, when s0c holds only some of them: a rank-local job).

    Above LOOKUP_THRESHOLD only the two table cells per observation are kept (8 B instead
    of lmax(lmax+2) doubles); coefficient rows are formed from the table when needed.
    """
    n = len(s0c) if n_observations is None else n_observations
    if n > LOOKUP_THRESHOLD:
        cell_s0 = lookup_index(*theta_phi(s0c)).astype(np.int32)
        cell_s1 = lookup_index(*theta_phi(s1c)).astype(np.int32)
        component.configure_lookup(cell_s0, cell_s1)
    else:
        component.configure(sph_harm_coefficients(s0c, s1c, component.lmax))


# Rows per pass of configure_absorption_from_geometry: s0c and s1c of all rows (48 B per
# row, with their theta/phi temporaries ~100 B) were the peak RSS of a 1e6 sweep's model
# configuration; per chunk they are a few MB.
GEOMETRY_CHUNK_ROWS = 1 << 17


def configure_absorption_from_geometry(component, experiment, z_obs, s1) -> None:
    """configure_absorption(component, *crystal_frame_vectors(experiment, z_obs, s1)); above
    LOOKUP_THRESHOLD the vectors and their table cells are formed chunk by chunk (element by
    element, so the same cells as all rows at once)."""
    from ..backends import rank_local

    n = len(z_obs)
    # the dataset's rows on all ranks of a rank-local job choose the representation
    n_all = rank_local.total(n)
    if n_all <= LOOKUP_THRESHOLD:
        configure_absorption(component, *crystal_frame_vectors(experiment, z_obs, s1), n_all)
        return
    cell_s0 = np.empty(n, np.int32)
    cell_s1 = np.empty(n, np.int32)
    for start in range(0, n, GEOMETRY_CHUNK_ROWS):
        stop = min(start + GEOMETRY_CHUNK_ROWS, n)
        s0c, s1c = crystal_frame_vectors(experiment, z_obs[start:stop], s1[start:stop])
        cell_s0[start:stop] = lookup_index(*theta_phi(s0c)).astype(np.int32)
        cell_s1[start:stop] = lookup_index(*theta_phi(s1c)).astype(np.int32)
        del s0c, s1c
    component.configure_lookup(cell_s0, cell_s1)


# -- the component --------------------------------------------------------------------------


@parallel_when_large
def _lookup_rows(table, cell_s0, cell_s1):
    """(table[cell_s0] + table[cell_s1]) / 2, row by row."""
    n = cell_s0.shape[0]
    k = table.shape[1]
    out = np.empty((n, k))
    for r in prange(n):
        for j in range(k):
            out[r, j] = (table[cell_s0[r], j] + table[cell_s1[r], j]) / 2.0
    return out


@parallel_when_large
def _one_plus_lookup_dot(table, cell_s0, cell_s1, parameters):
    """1 + sum_j (table[c0, j] + table[c1, j]) / 2 * p_j without forming the rows."""
    n = cell_s0.shape[0]
    k = table.shape[1]
    out = np.empty(n)
    for r in prange(n):
        acc = 1.0
        for j in range(k):
            acc += (table[cell_s0[r], j] + table[cell_s1[r], j]) / 2.0 * parameters[j]
        out[r] = acc
    return out


@parallel_when_large
def _one_plus_table_dot(coefficients, parameters):
    n, k = coefficients.shape
    out = np.empty(n)
    for r in prange(n):
        acc = 1.0
        for j in range(k):
            acc += coefficients[r, j] * parameters[j]
        out[r] = acc
    return out


def _compact_cells(cells):
    """(used, compact): the distinct cell numbers ascending and each cell's position among
    them (int32), as np.unique(cells, return_inverse=True) gives them but without a sort when
    the cell numbers are a small range (the lookup grid): one presence table and a cumsum."""
    if cells.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    low, high = int(cells.min()), int(cells.max())
    if low < 0 or high - low > 4 * cells.size:
        used, compact = np.unique(cells, return_inverse=True)
        return used, compact.ravel().astype(np.int32)
    present = np.zeros(high - low + 1, dtype=bool)
    present[cells - low] = True
    used = np.flatnonzero(present).astype(np.int64) + low
    position = np.cumsum(present, dtype=np.int64) - 1
    return used, position[cells - low].astype(np.int32)


class SHAbsorption(Component):
    name = "absorption"
    null_parameter_value = 0.0

    def __init__(self, parameters, est_standard_devs=None, surface_weight=5e5):
        super().__init__(parameters, est_standard_devs)
        lmax = int(round(math.sqrt(self.n_parameters + 1) - 1))
        if n_sh_parameters(lmax) != self.n_parameters:
            raise ValueError(f"absorption: {self.n_parameters} is not lmax(lmax+2) parameters")
        self.lmax = lmax
        self.set_restraint(surface_weight)
        self._exact = np.zeros((0, self.n_parameters))
        # When configured from the lookup table: per observation the rows of s0c and s1c in
        # _table, which holds only the table cells the observations use (a few MB instead of
        # the whole 50 MB grid: ~24 000 of its 259 200 cells for a 1e6-observation sweep).
        self._cells = None
        self._table = None

    @property
    def n_deriv_columns(self) -> int:
        return self.n_parameters

    def set_restraint(self, surface_weight: float) -> None:
        self.restraint_weights = np.full(self.n_parameters, float(surface_weight))

    def configure(self, coefficients) -> None:
        """`coefficients` (n, lmax(lmax+2)): the per-observation harmonic table."""
        coefficients = np.ascontiguousarray(coefficients, dtype=np.float64)
        if coefficients.ndim != 2 or coefficients.shape[1] != self.n_parameters:
            raise ValueError("absorption: coefficient table does not match lmax")
        self._exact = coefficients
        self._cells = None
        self.n_configured = coefficients.shape[0]

    def configure_lookup(self, cell_s0, cell_s1) -> None:
        """Per observation the lookup-table cells of s0c and s1c (sph_harm_lookup_table)."""
        n = np.asarray(cell_s0).size
        used, compact = _compact_cells(np.concatenate([np.asarray(cell_s0, dtype=np.int64).ravel(),
                                                       np.asarray(cell_s1, dtype=np.int64).ravel()]))
        self._cells = (np.ascontiguousarray(compact[:n]), np.ascontiguousarray(compact[n:]))
        self._table = lookup_table_rows(used, self.lmax)
        self._exact = np.zeros((0, self.n_parameters))
        self.n_configured = n

    def coefficient_rows(self, rows=None) -> np.ndarray:
        """The (n, lmax(lmax+2)) harmonic coefficients of the configured rows (or `rows`)."""
        if self._cells is None:
            return np.ascontiguousarray(take_rows(self._exact, rows))
        return _lookup_rows(self._table, take_rows(self._cells[0], rows),
                            take_rows(self._cells[1], rows))

    @property
    def _coefficients(self):
        return self.coefficient_rows()

    def values(self, parameters=None, rows=None):
        """g of the configured rows (or `rows`) without the derivative table."""
        p = self._params(parameters)
        if self._cells is None:
            return _one_plus_table_dot(np.ascontiguousarray(take_rows(self._exact, rows)), p)
        return _one_plus_lookup_dot(self._table, take_rows(self._cells[0], rows),
                                    take_rows(self._cells[1], rows), p)

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        coefficients = self.coefficient_rows(rows)
        n = coefficients.shape[0]
        index = np.empty((n, self.n_parameters), dtype=np.int32)
        index[:] = np.arange(self.n_parameters, dtype=np.int32)
        return _one_plus_table_dot(coefficients, p), coefficients, index
