"""E^2 by groups equals cctbx's per-observation quasi-normalisation (dials-scaling.md 8.3)."""

import numpy as np
import pytest
from cctbx import sgtbx, uctbx

from dials_vmerge.merging.groups import flex_indices
from dials_vmerge.scaling.ih_table import group_sort, map_indices_to_asu
from dials_vmerge.scaling.normalisation import grouped_quasi_normalised_e_squared, n_shells


def quasi_normalised_e_squared(miller_index, intensity, space_group, unit_cell):
    """The reference: cctbx's intensity_quasi_normalisations on every observation, with the
    shells dials.scale sets up (what the library computed before it worked by groups)."""
    from cctbx import crystal, miller, uctbx
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    mset = miller.set(symmetry, flex_indices(miller_index), anomalous_flag=False)
    work = miller.array(mset, data=flex.double(np.maximum(intensity, 0.0)))
    work.set_observation_type_xray_intensity()
    d_star_sq = work.d_star_sq().data().as_numpy_array()
    lo, hi = float(d_star_sq.min()), float(d_star_sq.max())
    span = hi - lo
    lo = max(lo - span * 1e-6, 1e-12)
    hi += span * 1e-6
    work.setup_binner_d_star_sq_step(auto_binning=False, d_max=uctbx.d_star_sq_as_d(lo),
                                     d_min=uctbx.d_star_sq_as_d(hi),
                                     d_star_sq_step=(hi - lo) / n_shells(intensity.size))
    normalisation = work.intensity_quasi_normalisations().data().as_numpy_array()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(normalisation > 0, intensity / normalisation, 0.0)


@pytest.mark.parametrize("symbol, cell, n", [
    ("P 41 21 2", (60, 60, 90, 90, 90, 90), 30000),  # epsilon 2 and 4 on the axes
    ("P 1", (40, 50, 60, 80, 95, 100), 12000),  # 10 shells below 15 000 observations
    ("P 61 2 2", (70, 70, 120, 90, 90, 120), 18000),  # 15 shells
])
def test_grouped_e_squared_equals_the_per_observation_computation(symbol, cell, n):
    rng = np.random.default_rng(7)
    space_group = sgtbx.space_group_info(symbol).group()
    unit_cell = uctbx.unit_cell(cell)
    hkl = rng.integers(-20, 21, size=(n, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    asu = map_indices_to_asu(hkl, space_group, False)
    order, group_start = group_sort(asu)
    asu = asu[order]
    # Wilson-like intensities with some negatives (they count as 0 in the shell means)
    intensity = rng.exponential(100.0, size=len(asu)) - 15.0
    reference = quasi_normalised_e_squared(asu, intensity, space_group, unit_cell)
    grouped = grouped_quasi_normalised_e_squared(asu[group_start[:-1]], group_start,
                                                 intensity, space_group, unit_cell)
    # only the order of summation of the shell means differs
    np.testing.assert_allclose(grouped, reference, rtol=1e-12, atol=0)
