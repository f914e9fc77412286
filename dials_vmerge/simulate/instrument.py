"""Beam, single-panel detector and single-axis goniometer of the simulated experiment.

Conventions are those of DIALS files (dials-formats.md 4-5): `direction` points from the
sample to the source, s0 = -direction / wavelength; R(phi) = S . Rot(axis, phi) . F; a pixel
(x, y) sits at origin + x * px * fast + y * py * slow (mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Instrument:
    wavelength_a: float = 0.9795
    beam_direction: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    polarization_normal: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    polarization_fraction: float = 0.999
    distance_mm: float = 200.0
    pixel_size_mm: float = 0.172
    image_size_px: tuple = (2463, 2527)
    sensor_thickness_mm: float = 0.45
    sensor_mu_per_mm: float = 3.96
    rotation_axis: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0]))
    fixed_rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    setting_rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def s0(self) -> np.ndarray:
        unit = self.beam_direction / np.linalg.norm(self.beam_direction)
        return -unit / self.wavelength_a

    @property
    def fast_axis(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    @property
    def slow_axis(self) -> np.ndarray:
        return np.array([0.0, -1.0, 0.0])

    @property
    def detector_origin(self) -> np.ndarray:
        """Beam centre in the middle of the panel, panel normal along the beam."""
        nx, ny = self.image_size_px
        half_x = 0.5 * nx * self.pixel_size_mm
        half_y = 0.5 * ny * self.pixel_size_mm
        return -half_x * self.fast_axis - half_y * self.slow_axis + np.array(
            [0.0, 0.0, -self.distance_mm]
        )

    @property
    def unit_rotation_axis(self) -> np.ndarray:
        return self.rotation_axis / np.linalg.norm(self.rotation_axis)

    @property
    def lab_rotation_axis(self) -> np.ndarray:
        return self.setting_rotation @ self.unit_rotation_axis

    def max_two_theta_rad(self) -> float:
        """Largest scattering angle the panel edge (shortest half-width) still records."""
        nx, ny = self.image_size_px
        half = 0.5 * min(nx, ny) * self.pixel_size_mm
        return float(np.arctan2(half, self.distance_mm))

    def distance_for_resolution(self, d_min: float) -> float:
        """Distance putting d_min at the panel edge, so the whole sphere is recorded."""
        two_theta = 2.0 * np.arcsin(self.wavelength_a / (2.0 * d_min))
        nx, ny = self.image_size_px
        half = 0.5 * min(nx, ny) * self.pixel_size_mm
        return float(half / np.tan(two_theta) * 0.98)


def rotation_matrices(axis: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    """Right-handed rotations about a unit axis (Rodrigues), shape (n, 3, 3)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.asarray(angles_rad, dtype=float)[:, None, None]
    return np.eye(3)[None] + np.sin(t) * k[None] + (1 - np.cos(t)) * (k @ k)[None]


def lorentz_polarisation(instrument: Instrument, s1: np.ndarray, rotation: bool) -> np.ndarray:
    """lp = L / P (multiplicative correction, dials-formats 3.1); L = 1 for stills."""
    s0 = instrument.s0
    s1_norm = np.linalg.norm(s1, axis=1)
    unit_s1 = s1 / s1_norm[:, None]
    unit_s0 = s0 / np.linalg.norm(s0)
    if rotation:
        m2_cross_s0 = np.cross(instrument.lab_rotation_axis, s0)
        lorentz = np.abs(s1 @ m2_cross_s0) / (np.linalg.norm(s0) * s1_norm)
    else:
        lorentz = np.ones(len(s1))
    f = instrument.polarization_fraction
    pn = instrument.polarization_normal / np.linalg.norm(instrument.polarization_normal)
    pn_dot = unit_s1 @ pn
    s0_dot = unit_s1 @ unit_s0
    polarisation = (1 - 2 * f) * (1 - pn_dot * pn_dot) + f * (1 + s0_dot * s0_dot)
    return lorentz / polarisation


def quantum_efficiency(instrument: Instrument, s1: np.ndarray) -> np.ndarray:
    """qe = 1 - exp(-mu t / |cos(n, s1)|) (divisory correction)."""
    normal = np.cross(instrument.fast_axis, instrument.slow_axis)
    cos_angle = np.abs(s1 @ normal) / np.linalg.norm(s1, axis=1)
    if instrument.sensor_thickness_mm <= 0 or instrument.sensor_mu_per_mm <= 0:
        return np.ones(len(s1))
    return 1.0 - np.exp(-instrument.sensor_mu_per_mm * instrument.sensor_thickness_mm / cos_angle)


def zeta(instrument: Instrument, s1: np.ndarray) -> np.ndarray:
    """zeta = m2 . unit(s1 x s0); entering the Ewald sphere <=> zeta < 0."""
    cross = np.cross(s1, instrument.s0)
    norm = np.linalg.norm(cross, axis=1)
    return (cross @ instrument.lab_rotation_axis) / np.where(norm > 0, norm, 1.0)
