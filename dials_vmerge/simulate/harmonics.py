"""Real spherical harmonics and the DIALS absorption surface (dials-scaling.md 4.6).

Y'_lm (l = 1..lmax, m = -l..l in that order) is the real orthonormal harmonic without the
Condon-Shortley phase: sqrt(2) N_lm P_l^|m|(cos theta) sin(|m| phi) for m < 0, N_l0 P_l^0 for
m = 0 and sqrt(2) N_lm P_l^m cos(m phi) for m > 0. The per-reflection coefficient is the mean
over the reversed incident beam s0c and the diffracted beam s1c, both rotated back into the
crystal frame by R(phi)^-1 and then aligned by (x, y, z) -> (-z, y, x); g_a = 1 + sum C c.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def n_coefficients(lmax: int) -> int:
    return lmax * (lmax + 2)


@njit(cache=True)
def _real_harmonics(x, y, z, lmax, out):
    """Y'_lm at the direction (x, y, z) (unit vector), written into out[0 : lmax(lmax+2)]."""
    cos_t = z
    sin_t = np.sqrt(max(0.0, x * x + y * y))
    phi = np.arctan2(y, x)
    # Fully normalised associated Legendre values, P[l, m] = N_lm P_l^m (no CS phase).
    p = np.zeros((lmax + 1, lmax + 1))
    p[0, 0] = np.sqrt(1.0 / (4.0 * np.pi))
    for m in range(1, lmax + 1):
        p[m, m] = np.sqrt((2.0 * m + 1.0) / (2.0 * m)) * sin_t * p[m - 1, m - 1]
    for m in range(0, lmax):
        p[m + 1, m] = np.sqrt(2.0 * m + 3.0) * cos_t * p[m, m]
    for m in range(0, lmax + 1):
        for l in range(m + 2, lmax + 1):
            a = np.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
            b = np.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
            p[l, m] = a * (cos_t * p[l - 1, m] - b * p[l - 2, m])
    root2 = np.sqrt(2.0)
    k = 0
    for l in range(1, lmax + 1):
        for m in range(-l, l + 1):
            if m < 0:
                out[k] = root2 * p[l, -m] * np.sin(-m * phi)
            elif m == 0:
                out[k] = p[l, 0]
            else:
                out[k] = root2 * p[l, m] * np.cos(m * phi)
            k += 1


def real_harmonics(directions: np.ndarray, lmax: int) -> np.ndarray:
    """Y'_lm for unit vectors (n, 3) -> (n, lmax(lmax+2)); used by tests and small callers."""
    out = np.empty((len(directions), n_coefficients(lmax)))
    for i in range(len(directions)):
        _real_harmonics(directions[i, 0], directions[i, 1], directions[i, 2], lmax, out[i])
    return out


@njit(cache=True)
def _rotate_back(setting, axis, fixed, phi, v, out):
    """out = R(phi)^T v with R = S Rot(axis, phi) F."""
    # u = S^T v
    u0 = setting[0, 0] * v[0] + setting[1, 0] * v[1] + setting[2, 0] * v[2]
    u1 = setting[0, 1] * v[0] + setting[1, 1] * v[1] + setting[2, 1] * v[2]
    u2 = setting[0, 2] * v[0] + setting[1, 2] * v[1] + setting[2, 2] * v[2]
    # w = Rot(axis, -phi) u
    c = np.cos(phi)
    s = -np.sin(phi)
    e_u = axis[0] * u0 + axis[1] * u1 + axis[2] * u2
    cx = axis[1] * u2 - axis[2] * u1
    cy = axis[2] * u0 - axis[0] * u2
    cz = axis[0] * u1 - axis[1] * u0
    w0 = u0 * c + cx * s + axis[0] * e_u * (1 - c)
    w1 = u1 * c + cy * s + axis[1] * e_u * (1 - c)
    w2 = u2 * c + cz * s + axis[2] * e_u * (1 - c)
    # out = F^T w
    out[0] = fixed[0, 0] * w0 + fixed[1, 0] * w1 + fixed[2, 0] * w2
    out[1] = fixed[0, 1] * w0 + fixed[1, 1] * w1 + fixed[2, 1] * w2
    out[2] = fixed[0, 2] * w0 + fixed[1, 2] * w1 + fixed[2, 2] * w2


@njit(parallel=True, cache=True)
def absorption_surface(phi_rad, s1, sample_to_source, setting, axis, fixed, coefficients, lmax):
    """g_a = 1 + sum_lm C_lm (Y'_lm(s0c) + Y'_lm(s1c)) / 2 for every observation."""
    n = phi_rad.shape[0]
    n_coef = lmax * (lmax + 2)
    out = np.empty(n)
    for i in prange(n):
        y0 = np.empty(n_coef)
        y1 = np.empty(n_coef)
        v = np.empty(3)
        r = np.empty(3)
        _rotate_back(setting, axis, fixed, phi_rad[i], sample_to_source, r)
        # alignment (x, y, z) -> (-z, y, x)
        _real_harmonics(-r[2], r[1], r[0], lmax, y0)
        norm = np.sqrt(s1[i, 0] ** 2 + s1[i, 1] ** 2 + s1[i, 2] ** 2)
        for a in range(3):
            v[a] = s1[i, a] / norm
        _rotate_back(setting, axis, fixed, phi_rad[i], v, r)
        _real_harmonics(-r[2], r[1], r[0], lmax, y1)
        total = 1.0
        for k in range(n_coef):
            total += coefficients[k] * 0.5 * (y0[k] + y1[k])
        out[i] = total
    return out
