"""E^2 by groups equals cctbx's per-observation quasi-normalisation (dials-scaling.md 8.3)."""

import numpy as np
import pytest
from cctbx import sgtbx, uctbx

from dials_vmerge.scaling.ih_table import group_sort, map_indices_to_asu
from dials_vmerge.scaling.normalisation import (
    grouped_quasi_normalised_e_squared,
    quasi_normalised_e_squared,
)


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
