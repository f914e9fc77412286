"""ASU indices from one cctbx mapping per symmetry orbit (dials_vmerge/asu_mapping.py,
issue 10) against cctbx's mapping of every row (merging.groups.asu_chunks)."""

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (cctbx before numba)
from cctbx import sgtbx

from dials_vmerge.asu_mapping import asu_indices_by_orbit
from dials_vmerge.merging.groups import asu_chunks, group_observations


def cctbx_rows(hkl, space_group, anomalous):
    out = np.empty((len(hkl), 3), np.int32)
    for start, stop, asu, _ in asu_chunks(hkl, space_group, anomalous):
        out[start:stop] = asu
    return out


def test_every_space_group_both_friedel_conventions():
    rng = np.random.default_rng(0)
    for number in range(1, 231):
        space_group = sgtbx.space_group_info(number=number).group()
        hkl = rng.integers(-9, 10, (3000, 3)).astype(np.int32)
        for anomalous in (False, True):
            mapped = asu_indices_by_orbit(hkl, space_group, anomalous, min_rows=0)
            assert mapped is not None
            np.testing.assert_array_equal(mapped, cctbx_rows(hkl, space_group, anomalous),
                                          err_msg=f"space group {number}, anomalous={anomalous}")


@pytest.mark.parametrize("symbol", ["P 1 1 21", "I 1 2 1", "R 3 :R", "R 3 2 :R",
                                    "P 21 21 2 (a,c,b)", "P 4 (a+b,a-b,c)",
                                    "F 2 3 (a+b,b+c,c+a)", "P 61 2 2 (x,y,z+1/12)"])
def test_non_standard_settings(symbol):
    space_group = sgtbx.space_group_info(symbol).group()
    hkl = np.random.default_rng(1).integers(-40, 41, (20000, 3)).astype(np.int64)
    for anomalous in (False, True):
        np.testing.assert_array_equal(asu_indices_by_orbit(hkl, space_group, anomalous, min_rows=0),
                                      cctbx_rows(hkl, space_group, anomalous))


def test_too_large_a_box_falls_back_and_grouping_is_unchanged():
    """Few rows spread over huge indices: no orbit table (None); the grouping's result is the
    same either way."""
    space_group = sgtbx.space_group_info("P 43 21 2").group()
    rng = np.random.default_rng(2)
    sparse = rng.integers(-5000, 5001, (1 << 15, 3)).astype(np.int32)
    assert asu_indices_by_orbit(sparse, space_group, True) is None
    dense = rng.integers(-30, 31, (1 << 15, 3)).astype(np.int32)
    assert asu_indices_by_orbit(dense, space_group, True) is not None
    for hkl in (sparse, dense):
        grouped = group_observations(hkl, space_group, True)
        asu = cctbx_rows(hkl, space_group, True)
        order = np.lexsort((asu[:, 2], asu[:, 1], asu[:, 0]))  # stable, as the grouping
        np.testing.assert_array_equal(grouped.permutation, order)
        np.testing.assert_array_equal(grouped.asu_index, np.unique(asu, axis=0))
