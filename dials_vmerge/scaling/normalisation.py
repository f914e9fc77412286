"""Quasi-normalised intensities E^2 = I / N(d) (dials-scaling.md 8.3).

Negative intensities count as 0 in the shell means; 10, 15 or 20 shells (<= 15k, <= 20k,
> 20k reflections) in equal d*^2 steps over the data range widened by 1e-6 of its span;
N(d) is cctbx's intensity_quasi_normalisations (shell mean of I/epsilon, interpolated in d*).
"""

from __future__ import annotations

import numpy as np


def n_shells(n_reflections):
    if n_reflections > 20000:
        return 20
    if n_reflections > 15000:
        return 15
    return 10


def quasi_normalised_e_squared(miller_index, intensity, space_group, unit_cell):
    from cctbx import crystal, miller, uctbx
    from cctbx.array_family import flex

    h = np.ascontiguousarray(miller_index, dtype=np.int32)
    indices = flex.miller_index(flex.int(np.ascontiguousarray(h[:, 0])),
                                flex.int(np.ascontiguousarray(h[:, 1])),
                                flex.int(np.ascontiguousarray(h[:, 2])))
    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    mset = miller.set(symmetry, indices, anomalous_flag=False)
    work = miller.array(mset, data=flex.double(np.maximum(intensity, 0.0)))
    work.set_observation_type_xray_intensity()
    d_star_sq = work.d_star_sq().data().as_numpy_array()
    lo, hi = float(d_star_sq.min()), float(d_star_sq.max())
    span = hi - lo
    lo = max(lo - span * 1e-6, 1e-12)
    hi += span * 1e-6
    shells = n_shells(intensity.size)
    work.setup_binner_d_star_sq_step(auto_binning=False, d_max=uctbx.d_star_sq_as_d(lo),
                                     d_min=uctbx.d_star_sq_as_d(hi),
                                     d_star_sq_step=(hi - lo) / shells)
    normalisation = work.intensity_quasi_normalisations().data().as_numpy_array()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(normalisation > 0, intensity / normalisation, 0.0)
