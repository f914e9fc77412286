"""Reflection prediction: Ewald-sphere crossings of a rotating crystal, and stills.

The kernels walk the Miller-index box slab by slab (one h value per slab, `prange` over
slabs). A first pass counts the hits of each slab, a prefix sum fixes where each slab writes,
and a second pass fills the output, so the order is the same for any thread count.

Rotation: with r0 = F A h and s0' = S^T s0, the Laue condition |s0 + S Rot(e, phi) r0| = |s0|
becomes a cos(phi) + b sin(phi) = c with
  a = s0'.r0 - (s0'.e)(e.r0),  b = s0'.(e x r0),  c = -|r0|^2 / 2 - (s0'.e)(e.r0),
so phi = atan2(b, a) +- acos(c / sqrt(a^2 + b^2)): both crossings are kept when they fall in
the scanned range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .instrument import Instrument


@dataclass
class Predictions:
    """Predicted reflections of one experiment (one row per recorded crossing)."""

    miller_index: np.ndarray  # (n, 3) int32, crystal setting (not ASU)
    phi_rad: np.ndarray  # rotation angle (absolute); 0 for stills
    s1: np.ndarray  # (n, 3)
    x_mm: np.ndarray
    y_mm: np.ndarray
    code: np.ndarray  # 2 * unique_id + hand (0 = I(+), 1 = I(-))
    excitation: np.ndarray  # stills: excitation error |s0 + A h| - 1/lambda (1/A); rotation: 0

    @property
    def n(self) -> int:
        return len(self.phi_rad)


def _detector_frame(instrument: Instrument):
    origin = instrument.detector_origin
    fast = instrument.fast_axis
    slow = instrument.slow_axis
    nx, ny = instrument.image_size_px
    return (
        origin, fast, slow, np.cross(fast, slow),
        nx * instrument.pixel_size_mm, ny * instrument.pixel_size_mm,
    )


@njit(cache=True)
def _hit_detector(s1x, s1y, s1z, origin, fast, slow, normal, width, height, out_xy):
    """Intersect the ray t*s1 (t > 0) with the panel plane; True if inside the panel."""
    denom = s1x * normal[0] + s1y * normal[1] + s1z * normal[2]
    if denom == 0.0:
        return False
    t = (origin[0] * normal[0] + origin[1] * normal[1] + origin[2] * normal[2]) / denom
    if t <= 0.0:
        return False
    vx = t * s1x - origin[0]
    vy = t * s1y - origin[1]
    vz = t * s1z - origin[2]
    x = vx * fast[0] + vy * fast[1] + vz * fast[2]
    y = vx * slow[0] + vy * slow[1] + vz * slow[2]
    if x < 0.0 or x >= width or y < 0.0 or y >= height:
        return False
    out_xy[0] = x
    out_xy[1] = y
    return True


@njit(cache=True)
def _rotation_slab(ih, hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, phi0, phi_span,
                   dstar_max_sq, origin, fast, slow, normal, width, height,
                   write, start, out_hkl, out_phi, out_s1, out_xy, out_code):
    h = ih - hmax
    count = 0
    xy = np.empty(2)
    two_pi = 2.0 * np.pi
    s0p_e = s0p[0] * axis[0] + s0p[1] * axis[1] + s0p[2] * axis[2]
    for ik in range(2 * kmax + 1):
        k = ik - kmax
        for il in range(2 * lmax + 1):
            code = grid[ih, ik, il]
            if code < 0:
                continue
            l = il - lmax
            r0x = FA[0, 0] * h + FA[0, 1] * k + FA[0, 2] * l
            r0y = FA[1, 0] * h + FA[1, 1] * k + FA[1, 2] * l
            r0z = FA[2, 0] * h + FA[2, 1] * k + FA[2, 2] * l
            r_sq = r0x * r0x + r0y * r0y + r0z * r0z
            if r_sq > dstar_max_sq:
                continue
            e_r = axis[0] * r0x + axis[1] * r0y + axis[2] * r0z
            a = s0p[0] * r0x + s0p[1] * r0y + s0p[2] * r0z - s0p_e * e_r
            cx = axis[1] * r0z - axis[2] * r0y
            cy = axis[2] * r0x - axis[0] * r0z
            cz = axis[0] * r0y - axis[1] * r0x
            b = s0p[0] * cx + s0p[1] * cy + s0p[2] * cz
            c = -0.5 * r_sq - s0p_e * e_r
            amp = np.sqrt(a * a + b * b)
            if amp < 1e-12 or abs(c) >= amp:
                continue
            base = np.arctan2(b, a)
            half = np.arccos(c / amp)
            for sign in (-1.0, 1.0):
                phi = base + sign * half
                phi = phi0 + ((phi - phi0) % two_pi)
                if phi - phi0 >= phi_span:
                    continue
                cos_p = np.cos(phi)
                sin_p = np.sin(phi)
                one_c = 1.0 - cos_p
                # Rodrigues: Rot r0 = r0 cos + (e x r0) sin + e (e.r0)(1 - cos)
                rx = r0x * cos_p + cx * sin_p + axis[0] * e_r * one_c
                ry = r0y * cos_p + cy * sin_p + axis[1] * e_r * one_c
                rz = r0z * cos_p + cz * sin_p + axis[2] * e_r * one_c
                s1x = s0[0] + S[0, 0] * rx + S[0, 1] * ry + S[0, 2] * rz
                s1y = s0[1] + S[1, 0] * rx + S[1, 1] * ry + S[1, 2] * rz
                s1z = s0[2] + S[2, 0] * rx + S[2, 1] * ry + S[2, 2] * rz
                if not _hit_detector(s1x, s1y, s1z, origin, fast, slow, normal, width, height, xy):
                    continue
                if write:
                    row = start + count
                    out_hkl[row, 0] = h
                    out_hkl[row, 1] = k
                    out_hkl[row, 2] = l
                    out_phi[row] = phi
                    out_s1[row, 0] = s1x
                    out_s1[row, 1] = s1y
                    out_s1[row, 2] = s1z
                    out_xy[row, 0] = xy[0]
                    out_xy[row, 1] = xy[1]
                    out_code[row] = code
                count += 1
    return count


@njit(parallel=True, cache=True)
def _rotation_counts(hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, phi0, phi_span, dstar_max_sq,
                     origin, fast, slow, normal, width, height):
    n_slabs = 2 * hmax + 1
    counts = np.zeros(n_slabs, dtype=np.int64)
    dummy_i = np.empty((0, 3), dtype=np.int32)
    dummy_f = np.empty(0)
    dummy_f3 = np.empty((0, 3))
    dummy_f2 = np.empty((0, 2))
    dummy_c = np.empty(0, dtype=np.int32)
    for ih in prange(n_slabs):
        counts[ih] = _rotation_slab(ih, hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, phi0,
                                    phi_span, dstar_max_sq, origin, fast, slow, normal, width,
                                    height, False, 0, dummy_i, dummy_f, dummy_f3, dummy_f2, dummy_c)
    return counts


@njit(parallel=True, cache=True)
def _rotation_fill(hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, phi0, phi_span, dstar_max_sq,
                   origin, fast, slow, normal, width, height, offsets,
                   out_hkl, out_phi, out_s1, out_xy, out_code):
    for ih in prange(2 * hmax + 1):
        _rotation_slab(ih, hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, phi0, phi_span,
                       dstar_max_sq, origin, fast, slow, normal, width, height, True,
                       offsets[ih], out_hkl, out_phi, out_s1, out_xy, out_code)


def predict_rotation(instrument: Instrument, a_matrix: np.ndarray, grid, box, d_min: float,
                     phi_start_rad: float, phi_span_rad: float) -> Predictions:
    hmax, kmax, lmax = box
    FA = instrument.fixed_rotation @ a_matrix
    S = np.ascontiguousarray(instrument.setting_rotation, dtype=float)
    axis = instrument.unit_rotation_axis
    s0 = instrument.s0
    s0p = S.T @ s0
    origin, fast, slow, normal, width, height = _detector_frame(instrument)
    args = (hmax, kmax, lmax, grid, FA, S, axis, s0, s0p, float(phi_start_rad),
            float(phi_span_rad), 1.0 / d_min ** 2, origin, fast, slow, normal, width, height)
    counts = _rotation_counts(*args)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    hkl = np.empty((n, 3), dtype=np.int32)
    phi = np.empty(n)
    s1 = np.empty((n, 3))
    xy = np.empty((n, 2))
    code = np.empty(n, dtype=np.int32)
    _rotation_fill(*args, offsets, hkl, phi, s1, xy, code)
    return Predictions(hkl, phi, s1, xy[:, 0].copy(), xy[:, 1].copy(), code, np.zeros(n))


@njit(cache=True)
def _still_slab(ih, hmax, kmax, lmax, grid, A, s0, inv_wavelength, dstar_max_sq, max_excitation,
                origin, fast, slow, normal, width, height,
                write, start, out_hkl, out_s1, out_xy, out_code, out_eps):
    h = ih - hmax
    count = 0
    xy = np.empty(2)
    for ik in range(2 * kmax + 1):
        k = ik - kmax
        for il in range(2 * lmax + 1):
            code = grid[ih, ik, il]
            if code < 0:
                continue
            l = il - lmax
            rx = A[0, 0] * h + A[0, 1] * k + A[0, 2] * l
            ry = A[1, 0] * h + A[1, 1] * k + A[1, 2] * l
            rz = A[2, 0] * h + A[2, 1] * k + A[2, 2] * l
            if rx * rx + ry * ry + rz * rz > dstar_max_sq:
                continue
            s2x = s0[0] + rx
            s2y = s0[1] + ry
            s2z = s0[2] + rz
            s2_len = np.sqrt(s2x * s2x + s2y * s2y + s2z * s2z)
            excitation = s2_len - inv_wavelength
            if abs(excitation) > max_excitation:
                continue
            # The diffracted beam leaves along s2, on the Ewald sphere.
            scale = inv_wavelength / s2_len
            s1x = s2x * scale
            s1y = s2y * scale
            s1z = s2z * scale
            if not _hit_detector(s1x, s1y, s1z, origin, fast, slow, normal, width, height, xy):
                continue
            if write:
                row = start + count
                out_hkl[row, 0] = h
                out_hkl[row, 1] = k
                out_hkl[row, 2] = l
                out_s1[row, 0] = s1x
                out_s1[row, 1] = s1y
                out_s1[row, 2] = s1z
                out_xy[row, 0] = xy[0]
                out_xy[row, 1] = xy[1]
                out_code[row] = code
                out_eps[row] = excitation
            count += 1
    return count


@njit(parallel=True, cache=True)
def _still_counts(hmax, kmax, lmax, grid, A, s0, inv_wavelength, dstar_max_sq, max_excitation,
                  origin, fast, slow, normal, width, height):
    n_slabs = 2 * hmax + 1
    counts = np.zeros(n_slabs, dtype=np.int64)
    dummy_i = np.empty((0, 3), dtype=np.int32)
    dummy_f3 = np.empty((0, 3))
    dummy_f2 = np.empty((0, 2))
    dummy_c = np.empty(0, dtype=np.int32)
    dummy_f = np.empty(0)
    for ih in prange(n_slabs):
        counts[ih] = _still_slab(ih, hmax, kmax, lmax, grid, A, s0, inv_wavelength, dstar_max_sq,
                                 max_excitation, origin, fast, slow, normal, width, height,
                                 False, 0, dummy_i, dummy_f3, dummy_f2, dummy_c, dummy_f)
    return counts


@njit(parallel=True, cache=True)
def _still_fill(hmax, kmax, lmax, grid, A, s0, inv_wavelength, dstar_max_sq, max_excitation,
                origin, fast, slow, normal, width, height, offsets,
                out_hkl, out_s1, out_xy, out_code, out_eps):
    for ih in prange(2 * hmax + 1):
        _still_slab(ih, hmax, kmax, lmax, grid, A, s0, inv_wavelength, dstar_max_sq,
                    max_excitation, origin, fast, slow, normal, width, height, True,
                    offsets[ih], out_hkl, out_s1, out_xy, out_code, out_eps)


def predict_still(instrument: Instrument, a_matrix: np.ndarray, grid, box, d_min: float,
                  max_excitation: float) -> Predictions:
    hmax, kmax, lmax = box
    origin, fast, slow, normal, width, height = _detector_frame(instrument)
    args = (hmax, kmax, lmax, grid, np.ascontiguousarray(a_matrix), instrument.s0,
            1.0 / instrument.wavelength_a, 1.0 / d_min ** 2, float(max_excitation),
            origin, fast, slow, normal, width, height)
    counts = _still_counts(*args)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    hkl = np.empty((n, 3), dtype=np.int32)
    s1 = np.empty((n, 3))
    xy = np.empty((n, 2))
    code = np.empty(n, dtype=np.int32)
    eps = np.empty(n)
    _still_fill(*args, offsets, hkl, s1, xy, code, eps)
    return Predictions(hkl, np.zeros(n), s1, xy[:, 0].copy(), xy[:, 1].copy(), code, eps)
