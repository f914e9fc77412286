"""The .expt reader/writer and the geometry derived from it, checked against real files."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import DATA
from quartz_helpers import two_quartz_sweep_paths
from dials_vmerge import geometry
from dials_vmerge.errors import FileFormatError, VmergeError
from dials_vmerge.io import read_experiments, read_reflections, write_experiments
from dials_vmerge.io.combine import load_experiments_and_reflections

REAL_EXPT = sorted(glob.glob(os.path.join(DATA, "*", "*.expt")) + glob.glob(os.path.join(DATA, "*", "*.json")))


@pytest.mark.parametrize("path", REAL_EXPT, ids=lambda p: os.path.relpath(p, DATA))
def test_round_trip_gives_equal_json(path, tmp_path):
    experiments = read_experiments(path)
    out = tmp_path / "copy.expt"
    write_experiments(experiments, str(out))
    original = json.load(open(path))
    written = json.load(open(out))
    assert written == original
    assert list(written) == list(original)


def test_quartz_writes_back_byte_identical(quartz_dir, tmp_path):
    for name in ("integrated.expt", "scaled.expt"):
        out = tmp_path / name
        write_experiments(read_experiments(os.path.join(quartz_dir, name)), str(out))
        assert out.read_bytes() == open(os.path.join(quartz_dir, name), "rb").read()


def test_models_and_symmetry(quartz_dir):
    e = read_experiments(os.path.join(quartz_dir, "scaled.expt"))[0]
    assert e.identifier == "001f4105-10c8-4ecd-ac88-2c789f79b510"
    assert str(geometry.space_group_info(e)) == "P 31 2 1"
    np.testing.assert_allclose(geometry.unit_cell(e).parameters(), (4.9249, 4.9249, 5.4014, 90, 90, 120), atol=1e-4)
    assert geometry.image_range(e) == (1, 100)
    assert geometry.oscillation(e) == (-50.0, 1.0)
    assert e.scaling_model["__id__"] == "physical"
    insulin = read_experiments(os.path.join(DATA, "insulin_processed", "scaled.expt"))[0]
    assert str(geometry.space_group_info(insulin)) == "I 2 3"


def test_geometry_matches_dials_columns(quartz_dir):
    e = read_experiments(os.path.join(quartz_dir, "integrated.expt"))[0]
    t = read_reflections(os.path.join(quartz_dir, "integrated.refl"))
    z_cal = t["xyzcal.px"][:, 2]
    np.testing.assert_allclose(np.radians(geometry.rotation_angle_deg(e, z_cal)), t["xyzcal.mm"][:, 2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry.d_spacing(e, t["miller_index"]), t["d"], rtol=1e-12)
    s1 = geometry.predicted_s1(e, t["miller_index"], z_cal)
    inside = (z_cal >= 0) & (z_cal <= 100)  # DIALS extrapolates outside the scan differently
    assert inside.sum() == 1623
    np.testing.assert_allclose(s1[inside], t["s1"][inside], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(t["s1"], axis=1), 1 / geometry.wavelength(e), rtol=1e-13)
    # entering <=> zeta < 0 with zeta = m2 . unit(s1 x s0)
    cross = np.cross(t["s1"], geometry.s0(e))
    zeta = cross @ geometry.lab_rotation_axis(e) / np.linalg.norm(cross, axis=1)
    np.testing.assert_allclose(zeta, t["zeta"], atol=1e-12)


def test_non_experiment_json_is_rejected(tmp_path):
    p = tmp_path / "x.expt"
    p.write_text('{"hello": 1}')
    with pytest.raises(FileFormatError, match="not a DIALS ExperimentList"):
        read_experiments(str(p))
    p.write_text('{"__id__": "ExperimentList", "experiment": [{"beam": 3}], "beam": []}')
    with pytest.raises(FileFormatError, match="refers to beam 3"):
        read_experiments(str(p))
    p.write_bytes(open(os.path.join(DATA, "quartz_processed", "integrated.refl"), "rb").read())
    with pytest.raises(FileFormatError, match="binary"):
        read_experiments(str(p))
    p.write_text("{ not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_experiments(str(p))


def test_identifier_mismatch_and_duplicates(quartz_dir, tmp_path):
    expt = os.path.join(quartz_dir, "integrated.expt")
    refl = os.path.join(quartz_dir, "integrated.refl")
    d = json.load(open(expt))
    d["experiment"][0]["identifier"] = "someone-else"
    other = tmp_path / "other.expt"
    other.write_text(json.dumps(d))
    with pytest.raises(VmergeError, match="not in"):
        load_experiments_and_reflections([str(other)], [refl])
    with pytest.raises(VmergeError, match="given twice"):
        load_experiments_and_reflections([expt, expt], [refl, refl])
    with pytest.raises(VmergeError, match="in pairs"):
        load_experiments_and_reflections([expt], [refl, refl])


def test_two_pairs_combine_and_renumber(tmp_path):
    """Two sweeps whose tables both use id 0 are renumbered 0 and 1 (DIALS behaviour)."""
    experiments, table = load_experiments_and_reflections(*two_quartz_sweep_paths(tmp_path))
    assert experiments.identifiers() == ["001f4105-10c8-4ecd-ac88-2c789f79b510", "second-sweep"]
    assert table.identifiers == {0: "001f4105-10c8-4ecd-ac88-2c789f79b510", 1: "second-sweep"}
    assert np.bincount(table["id"]).tolist() == [1653, 1653]
