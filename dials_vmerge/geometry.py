"""Numbers derived from experiment models: symmetry, cell, UB, beam, goniometer, scan angles.

Conventions (dials-formats.md 5.x): s0 = -direction / wavelength (direction points from the
sample to the source); lab rotation R(phi) = S . Rot(axis, phi) . F; image n covers frame
z in [n-1, n); phi(z) = osc_start + (z - (first_image - 1)) * osc_width, in degrees.
"""

from __future__ import annotations

import numpy as np
from cctbx import sgtbx, uctbx

from .errors import VmergeError


def space_group(expt):
    if expt.crystal is None:
        raise VmergeError(f"experiment {expt.identifier}: no crystal model")
    try:
        return sgtbx.space_group(str(expt.crystal["space_group_hall_symbol"]))
    except (KeyError, RuntimeError) as e:
        raise VmergeError(f"experiment {expt.identifier}: bad crystal space group ({e})") from None


def space_group_info(expt):
    return sgtbx.space_group_info(group=space_group(expt))


def real_space_matrix(expt) -> np.ndarray:
    """3x3 matrix whose rows are the direct-lattice vectors a, b, c (Angstrom, lab frame)."""
    c = expt.crystal
    return np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]], dtype=float)


def A_matrix(expt) -> np.ndarray:
    """UB: columns are a*, b*, c*; d* = A h."""
    return np.linalg.inv(real_space_matrix(expt))


def unit_cell(expt):
    if expt.crystal is None:
        raise VmergeError(f"experiment {expt.identifier}: no crystal model")
    if "recalculated_unit_cell" in expt.crystal:
        return uctbx.unit_cell(tuple(expt.crystal["recalculated_unit_cell"]))
    m = real_space_matrix(expt)
    return uctbx.unit_cell(metrical_matrix=_metrical(m))


def _metrical(m):
    g = m @ m.T
    return (g[0, 0], g[1, 1], g[2, 2], g[0, 1], g[0, 2], g[1, 2])


def median_unit_cell(experiments):
    """DIALS's best unit cell for several experiments: the median of each parameter."""
    params = np.array([unit_cell(e).parameters() for e in experiments])
    return uctbx.unit_cell(tuple(np.median(params, axis=0)))


def d_spacing(expt, miller_index: np.ndarray) -> np.ndarray:
    """d = 1/|A h| (Angstrom) from the static crystal model."""
    dstar = np.asarray(miller_index, dtype=float) @ A_matrix(expt).T
    with np.errstate(divide="ignore"):
        return 1.0 / np.linalg.norm(dstar, axis=1)


def wavelength(expt) -> float:
    return float(expt.beam["wavelength"])


def sample_to_source(expt) -> np.ndarray:
    d = np.asarray(expt.beam["direction"], dtype=float)
    return d / np.linalg.norm(d)


def s0(expt) -> np.ndarray:
    """Incident beam vector (1/Angstrom)."""
    return -sample_to_source(expt) / wavelength(expt)


def _goniometer_frames(expt):
    g = expt.goniometer
    if g is None:
        return np.eye(3), np.array([1.0, 0.0, 0.0]), np.eye(3)
    if "axes" in g:
        axes = [np.asarray(a, dtype=float) for a in g["axes"]]
        angles = g["angles"]
        k = int(g["scan_axis"])
        fixed = np.eye(3)
        for i in range(k):
            fixed = rotation_matrix(axes[i], angles[i]) @ fixed
        setting = np.eye(3)
        for i in range(k + 1, len(axes)):
            setting = rotation_matrix(axes[i], angles[i]) @ setting
        return setting, axes[k] / np.linalg.norm(axes[k]), fixed
    setting = np.asarray(g.get("setting_rotation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    fixed = np.asarray(g.get("fixed_rotation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    axis = np.asarray(g["rotation_axis"], dtype=float)
    return setting, axis / np.linalg.norm(axis), fixed


def rotation_axis(expt) -> np.ndarray:
    """The rotation axis at the datum (crystal-side, before the setting rotation)."""
    return _goniometer_frames(expt)[1]


def setting_rotation(expt) -> np.ndarray:
    return _goniometer_frames(expt)[0]


def fixed_rotation(expt) -> np.ndarray:
    return _goniometer_frames(expt)[2]


def lab_rotation_axis(expt) -> np.ndarray:
    """m2 = S . axis: the spindle axis in the lab frame."""
    s, axis, _ = _goniometer_frames(expt)
    return s @ axis


def rotation_matrix(axis, angle_deg) -> np.ndarray:
    """Right-handed rotation about `axis` by `angle_deg` degrees (Rodrigues)."""
    return rotation_matrices(axis, [angle_deg])[0]


def rotation_matrices(axis, angles_deg) -> np.ndarray:
    """Stack of right-handed rotations about one axis, shape (n, 3, 3)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    t = np.radians(np.asarray(angles_deg, dtype=float))[:, None, None]
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3)[None] + np.sin(t) * k[None] + (1 - np.cos(t)) * (k @ k)[None]


def lab_rotations(expt, angles_deg) -> np.ndarray:
    """R(phi) = S . Rot(axis, phi) . F for each angle, shape (n, 3, 3)."""
    s, axis, f = _goniometer_frames(expt)
    return s[None] @ rotation_matrices(axis, angles_deg) @ f[None]


def image_range(expt):
    if expt.scan is None:
        return (0, 0)
    first, last = expt.scan["image_range"]
    return int(first), int(last)


def oscillation(expt):
    """(phi at the start of the first image, width per image), degrees."""
    if expt.scan is None:
        return (0.0, 0.0)
    start, width = expt.scan["oscillation"]
    return float(start), float(width)


def rotation_angle_deg(expt, z) -> np.ndarray:
    """phi(z) in degrees for frame coordinates z."""
    start, width = oscillation(expt)
    first, _ = image_range(expt)
    return start + (np.asarray(z, dtype=float) - (first - 1)) * width


def oscillation_range_deg(expt) -> float:
    first, last = image_range(expt)
    return (last - first + 1) * oscillation(expt)[1] if expt.scan is not None else 0.0


def predicted_s1(expt, miller_index, z) -> np.ndarray:
    """s1 = s0 + R(phi(z)) A h (stills: no rotation).

    With a scan-varying crystal (`A_at_scan_points`, UB at frame boundaries) the rotated
    reciprocal-lattice vector moves linearly between the two neighbouring boundaries, as
    DIALS predicts it.
    """
    h = np.asarray(miller_index, dtype=float)
    if expt.is_still:
        return s0(expt)[None, :] + h @ A_matrix(expt).T
    z = np.asarray(z, dtype=float)
    scan_points = expt.crystal.get("A_at_scan_points")
    if not scan_points:
        rot = lab_rotations(expt, rotation_angle_deg(expt, z))
        return s0(expt)[None, :] + np.einsum("nij,nj->ni", rot, h @ A_matrix(expt).T)
    ub = np.asarray(scan_points, dtype=float).reshape(-1, 3, 3)
    first, _ = image_range(expt)
    z_rel = z - (first - 1)
    k = np.clip(np.floor(z_rel).astype(np.int64), 0, len(ub) - 2)
    frac = z_rel - k
    r = []
    for boundary in (k, k + 1):
        rot = lab_rotations(expt, rotation_angle_deg(expt, boundary + (first - 1)))
        r.append(np.einsum("nij,njk,nk->ni", rot, ub[boundary], h))
    return s0(expt)[None, :] + r[0] + frac[:, None] * (r[1] - r[0])


def crystal_frame_vectors(expt, s1, z):
    """s0c, s1c: sample-to-source and unit s1 rotated into the crystal frame by R(phi)^-1."""
    rot = lab_rotations(expt, rotation_angle_deg(expt, z))
    back = np.transpose(rot, (0, 2, 1))
    s0c = back @ sample_to_source(expt)
    norm = np.linalg.norm(s1, axis=1)
    unit = np.divide(s1, norm[:, None], out=np.zeros_like(s1), where=norm[:, None] > 0)
    s1c = np.einsum("nij,nj->ni", back, unit)
    return s0c, s1c
