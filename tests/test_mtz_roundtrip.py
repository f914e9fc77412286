"""MTZ files read back with gemmi: columns, types, symmetry, cell, values."""

import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401
from cctbx import sgtbx, uctbx

from dials_vmerge.merging.groups import map_indices_to_asu, mtz_isym
from dials_vmerge.mtz import MERGED_COLUMNS, write_merged_mtz, write_unmerged_mtz

gemmi = pytest.importorskip("gemmi")


def test_merged_mtz_round_trip(tmp_path):
    sg = sgtbx.space_group_info("P 41 21 2").group()
    cell = uctbx.unit_cell((61.5, 61.5, 82.25, 90, 90, 90))
    hkl = np.array([[1, 2, 3], [2, 0, 4], [5, 1, 1], [3, 3, 0]])
    rng = np.random.default_rng(0)
    columns = {label: rng.uniform(1, 100, size=4) for label, _ in MERGED_COLUMNS}
    columns["FreeR_flag"] = np.array([0, 1, 2, 19])
    columns["N"] = np.array([3, 4, 5, 1])
    columns["I(-)"][3] = np.nan  # a centric reflection has no I(-)
    path = str(tmp_path / "merged.mtz")
    write_merged_mtz(path, sg, cell, hkl, columns, wavelength=0.9793)
    mtz = gemmi.read_mtz_file(path)
    assert mtz.spacegroup.hm == "P 41 21 2"
    assert mtz.cell.parameters == pytest.approx((61.5, 61.5, 82.25, 90, 90, 90), abs=1e-4)
    assert [(c.label, c.type) for c in mtz.columns] == [("H", "H"), ("K", "H"), ("L", "H")] + [
        (label, t) for label, t in MERGED_COLUMNS]
    assert mtz.datasets[-1].wavelength == pytest.approx(0.9793, abs=1e-6)
    data = np.array(mtz)
    # rows sorted by H K L, as the SORT header says
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    assert mtz.sort_order == [1, 2, 3, 0, 0]
    np.testing.assert_array_equal(data[:, :3], hkl[order])
    for i, (label, _) in enumerate(MERGED_COLUMNS):
        np.testing.assert_allclose(data[:, 3 + i], columns[label][order], rtol=1e-6,
                                   equal_nan=True)
    assert np.isnan(data[list(order).index(3), 3 + [l for l, _ in MERGED_COLUMNS].index("I(-)")])
    # real column ranges (missing values left out), missing number NaN
    for i, column in enumerate(mtz.columns):
        assert column.min_value == pytest.approx(np.nanmin(data[:, i]))
        assert column.max_value == pytest.approx(np.nanmax(data[:, i]))
    assert np.isnan(mtz.valm)
    assert not os.path.exists(path + ".part")


def test_unmerged_mtz_round_trip_recovers_original_indices(tmp_path):
    sg = sgtbx.space_group_info("P 31 2 1").group()
    cell = uctbx.unit_cell((4.92, 4.92, 5.40, 90, 90, 120))
    original = np.array([[1, 2, 3], [-1, -2, -3], [2, 1, -3], [-3, 1, 2], [0, 0, 3], [0, 0, -3],
                         [1, -1, 0], [-2, -1, -3]])
    asu, _ = map_indices_to_asu(original, sg, anomalous=False)
    isym = mtz_isym(original, sg)
    n = len(original)
    path = str(tmp_path / "unmerged.mtz")
    write_unmerged_mtz(path, sg, cell, asu, isym, np.arange(1, n + 1) * 3,
                       np.linspace(10, 80, n), np.full(n, 2.5), scale=np.full(n, 1.5),
                       scale_sigma=np.full(n, 0.01), extra={"LP": np.full(n, 0.7)})
    mtz = gemmi.read_mtz_file(path)
    assert [(c.label, c.type) for c in mtz.columns] == [
        ("H", "H"), ("K", "H"), ("L", "H"), ("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"),
        ("SIGI", "Q"), ("SCALEUSED", "R"), ("SIGSCALEUSED", "R"), ("LP", "R")]
    assert mtz.spacegroup.hm == "P 31 2 1"
    assert sorted(b.number for b in mtz.batches) == list(np.arange(1, n + 1) * 3)
    data = np.array(mtz)
    order = np.lexsort((asu[:, 2], asu[:, 1], asu[:, 0]))  # stable: equal H K L keep order
    np.testing.assert_allclose(data[:, 5], np.linspace(10, 80, n)[order], rtol=1e-6)
    # gemmi undoes M/ISYM with the file's symmetry operators: our ISYM must be right
    mtz.switch_to_original_hkl()
    np.testing.assert_array_equal(np.array(mtz)[:, :3].astype(int), original[order])


def test_free_r_flags_ccp4_convention_fraction_and_determinism():
    import random

    from cctbx import crystal, miller

    from dials_vmerge.mtz import free_r_flags

    symmetry = crystal.symmetry(unit_cell=(61.5, 61.5, 82.25, 90, 90, 90),
                                space_group_symbol="P 41 21 2")
    unique = miller.build_set(symmetry, anomalous_flag=False, d_min=2.5)
    hkl = np.array(unique.indices(), dtype=np.int32)
    sg, cell = symmetry.space_group(), symmetry.unit_cell()
    random.seed(12345)
    before = random.random()
    random.seed(12345)
    flags = free_r_flags(hkl, sg, cell, seed=3)
    assert random.random() == before  # the caller's random stream is left untouched
    assert flags.dtype == np.int32 and len(flags) == len(hkl) > 5000
    assert set(np.unique(flags)) == set(range(20))  # CCP4: 0..19, 0 = free
    assert np.mean(flags == 0) == pytest.approx(0.05, abs=0.01)
    # the same unique indices give the same flags, in whatever order they are given
    np.testing.assert_array_equal(free_r_flags(hkl, sg, cell, seed=3), flags)
    order = np.random.default_rng(0).permutation(len(hkl))
    np.testing.assert_array_equal(free_r_flags(hkl[order], sg, cell, seed=3), flags[order])
    other = free_r_flags(hkl, sg, cell, seed=4)
    assert np.mean(other != flags) > 0.5
    # cctbx's generator, called directly with the same seed, agrees
    random.seed(3)
    reference = unique.generate_r_free_flags(fraction=0.05, max_free=None, format="ccp4")
    np.testing.assert_array_equal(reference.data().as_numpy_array(), flags)


@pytest.mark.parametrize("seed", [0, 3, 2**40 + 7])
@pytest.mark.parametrize("upper", [0, 1, 19, 20, 999, 2**31 - 1])
def test_python_randint_draws_equal_pythons_randint(seed, upper):
    """The vectorised stream behind the free flags against Python's own random.randint loop
    (rejections included: upper 19 rejects 12 of every 32 draws, upper 20 fewer)."""
    import random

    from dials_vmerge.mtz import python_randint_draws

    generator = random.Random(seed)
    state = generator.getstate()
    expected = [generator.randint(0, upper) for _ in range(3000)]
    np.testing.assert_array_equal(python_randint_draws(state, 3000, upper), expected)


@pytest.mark.parametrize("cell, symbol", [
    ((61.5, 61.5, 82.25, 90, 90, 90), "P 41 21 2"),
    ((50, 60, 70, 90, 100, 90), "C 1 2 1"),
    ((40, 40, 40, 90, 90, 90), "I 2 3"),  # Niggli cell rhombohedral: its last bits matter
    ((80, 80, 120, 90, 90, 120), "P 61 2 2"),  # many 1/d^2 ties between orbits
    ((90, 90, 60, 90, 90, 120), "R 3 :H"),
    ((50, 50, 50, 80, 80, 80), "R 3 :R"),
    ((40, 50, 60, 90, 90.2, 90), "P 1 21 1"),  # lattice symmetry above the space group's
    ((50, 50.5, 70, 90, 90, 90), "P 2 2 2"),  # pseudo-tetragonal: averaged cell
    ((40, 50, 60, 70, 80, 100), "P 1"),
    ((60, 60, 60, 90, 90, 90), "P 1"),  # cubic lattice symmetry of a P1 crystal
])
def test_free_r_flags_on_lattice_orbits_equal_cctbx_generator(cell, symbol):
    """The numpy shortcut of the free flags (issue 10: one lattice-group mapping instead of
    cctbx's P1 expansion and two merges) against cctbx's generator itself, on the same
    miller set and seed, in groups whose lattice symmetry is higher than the space group's,
    with resolution ties, centred and rhombohedral lattices; any order of the indices."""
    import random

    from cctbx import crystal, miller

    from dials_vmerge.merging.groups import flex_indices
    from dials_vmerge.mtz import _lattice_orbit_free_flags, free_r_flags

    given = crystal.symmetry(unit_cell=cell, space_group_symbol=symbol)
    hkl = np.array(miller.build_set(given, anomalous_flag=False, d_min=3.0).indices(),
                   dtype=np.int32)
    hkl = hkl[np.random.default_rng(1).permutation(len(hkl))]
    sg, uc = given.space_group(), given.unit_cell()
    # free_r_flags's own set (its crystal.symmetry may change the cell's last bits, and with
    # them the order of equal resolutions)
    unique = miller.set(crystal.symmetry(unit_cell=uc, space_group=sg,
                                         assert_is_compatible_unit_cell=False),
                        flex_indices(hkl), anomalous_flag=False)
    for seed in (0, 7):
        random.seed(seed)
        assert _lattice_orbit_free_flags(unique, 0.05) is not None  # the shortcut applies
        random.seed(seed)
        reference = unique.generate_r_free_flags(fraction=0.05, max_free=None, format="ccp4")
        np.testing.assert_array_equal(free_r_flags(hkl, sg, uc, seed=seed),
                                      reference.data().as_numpy_array())
