"""Scaling against a reference (issue 16, test 2): stills whose true intensities are |F_model|^2
of a random cctbx structure, scaled against (a) an MTZ of the true intensities, (b) an MTZ of
amplitudes, (c) the model itself as .pdb and as mmCIF, (d) an MTZ with an overall B offset.

Truth: every still has its own KB model (K, B). The MTZ holds the simulator's true
intensities in the data's units, so K is recovered absolutely; the model's |F|^2 is on its
own absolute scale, so K / K_true is one global factor, the simulator's counts_scale (data
= K counts_scale |F|^2). A reference whose intensities carry exp(-dB / 2d^2) makes every
still's B larger by dB with K unchanged (DIALS: the KB decay term absorbs it).

Mean I/sigma 40 so that the per-still K is determined to well under 1% (~450 matched
observations per still); at I/sigma 10 the noise alone spreads K by ~1% RMS.
"""

import copy
import logging

import iotbx.phil
import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.cli import load_phil_text
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.mtz import write_merged_mtz
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.simulate import simulate_stills
from dials_vmerge.simulate.crystal import make_symmetry, random_xray_structure

LOG = logging.getLogger("test_reference_scaling")
N_STILLS = 40
B_OFFSET = 10.0


def scaling_params(*args):
    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    space_group, cell = make_symmetry("P 4 3 2", (60.0, 60.0, 60.0, 90.0, 90.0, 90.0))
    structure = random_xray_structure(space_group, cell, 300, seed=7)
    pdb = str(base / "model.pdb")
    with open(pdb, "w") as f:
        f.write(structure.as_pdb_file())
    experiments, table, truth = simulate_stills(
        n_stills=N_STILLS, seed=3, true_intensities=pdb, mean_i_over_sigma=40.0)
    s = truth.structure  # true intensities in the data's units (times counts_scale)
    true_i = s.mean_intensity
    paths = {"pdb": pdb, "mtz": str(base / "true.mtz"), "amplitudes": str(base / "f.mtz"),
             "offset": str(base / "offset.mtz"), "cif": str(base / "model.cif")}
    write_merged_mtz(paths["mtz"], s.space_group, s.unit_cell, s.miller_index,
                     {"IMEAN": true_i, "SIGIMEAN": 0.01 * true_i + 1e-6})
    amplitude = np.sqrt(true_i)
    write_merged_mtz(paths["amplitudes"], s.space_group, s.unit_cell, s.miller_index,
                     {"F": amplitude, "SIGF": 0.005 * amplitude + 1e-6})
    damped = true_i * np.exp(-B_OFFSET / (2.0 * s.d ** 2))
    write_merged_mtz(paths["offset"], s.space_group, s.unit_cell, s.miller_index,
                     {"IMEAN": damped, "SIGIMEAN": 0.01 * damped + 1e-6})
    import iotbx.pdb

    pdb_input = iotbx.pdb.input(file_name=pdb)
    with open(paths["cif"], "w") as f:
        f.write(pdb_input.construct_hierarchy().as_mmcif_string(
            crystal_symmetry=pdb_input.crystal_symmetry()))
    return paths, (experiments, table, truth)


def scale_against(files, reference, *args):
    paths, (experiments_dict, table, truth) = files
    params = scaling_params(f"reference={paths[reference]}", "cut_data.d_min=2.0", *args)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    experiments, scaled, _ = run_scaling_job(params, experiments, table.copy(), LOG)
    k = np.array([e.scaling_model["scale"]["parameters"][0] for e in experiments])
    b = np.array([e.scaling_model["decay"]["parameters"][0] for e in experiments])
    true_k = np.array([m.parameters["scale"][0] for m in truth.models])
    true_b = np.array([m.parameters["decay"][0] for m in truth.models])
    return SimpleResult(experiments, scaled, params, k / true_k, b - true_b)


class SimpleResult:
    def __init__(self, experiments, table, params, k_ratio, b_shift):
        self.experiments, self.table, self.params = experiments, table, params
        self.k_ratio, self.b_shift = k_ratio, b_shift


@pytest.mark.parametrize("reference", ["mtz", "amplitudes"])
def test_per_still_scales_against_an_mtz_of_the_truth(files, reference):
    result = scale_against(files, reference)
    # reached: max |K/K_true - 1| 0.44% (intensities)
    assert np.max(np.abs(result.k_ratio - 1.0)) < 0.01, result.k_ratio
    assert np.max(np.abs(result.b_shift)) < 0.3
    # the reference is no dataset: only the stills are in the outputs
    assert len(result.experiments) == N_STILLS
    assert all(e.scaling_model["__id__"] == "KB" for e in result.experiments)
    assert sorted(np.unique(result.table["id"])) == list(range(N_STILLS))
    # few outliers against the exact truth; everything not cut before scaling is scaled
    assert result.table.get_flags(flags.outlier_in_scaling).mean() < 0.005
    assert result.table.get_flags(flags.scaled).sum() > 0.95 * np.sum(
        ~result.table.get_flags(flags.user_excluded_in_scaling))


def test_auto_small_scale_cutoff_follows_dials(files):
    result = scale_against(files, "mtz")
    paths, (_, table, truth) = files
    # DIALS: round(1e-5 / (<I_ref> / <I_sum>), 12); <I_sum> over integrated_sum rows, the
    # per-dataset means weighted by the datasets' row counts (recomputed here per still)
    reference_mean = float(np.mean(truth.structure.mean_intensity))
    sums, counts = [], []
    ok = table.get_flags(flags.integrated_sum)
    for i in range(N_STILLS):
        rows = table["id"] == i
        sums.append(float(np.mean(table["intensity.sum.value"][rows & ok])))
        counts.append(int(rows.sum()))
    data_mean = float(np.dot(sums, counts) / np.sum(counts))
    expected = round(1e-5 / (reference_mean / data_mean), 12)
    assert result.params.cut_data.small_scale_cutoff == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("reference", ["pdb", "cif"])
def test_per_still_scales_against_the_model(files, reference):
    _, (_, _, truth) = files
    result = scale_against(files, reference)
    # one global factor: data = K counts_scale |F_model|^2
    assert np.mean(result.k_ratio) == pytest.approx(truth.counts_scale, rel=0.01)
    relative = result.k_ratio / truth.counts_scale
    assert np.max(np.abs(relative - 1.0)) < 0.01, relative  # reached 0.44%
    assert np.max(np.abs(result.b_shift)) < 0.3


def test_reference_b_offset_is_absorbed_by_the_decay_terms(files):
    result = scale_against(files, "offset")
    # reached: mean B shift 9.86, sd 0.11; K within 1.8%
    assert np.mean(result.b_shift) == pytest.approx(B_OFFSET, abs=0.3)
    assert np.std(result.b_shift) < 0.3
    assert np.max(np.abs(result.k_ratio - 1.0)) < 0.025


def test_missing_reference_is_one_clear_error(files):
    from dials_vmerge.errors import VmergeError

    paths, (experiments_dict, table, _) = files
    with pytest.raises(VmergeError, match="reference=.*nothing.mtz: no such file"):
        run_scaling_job(scaling_params("reference=/nonexistent/nothing.mtz"),
                        ExperimentList.from_dict(copy.deepcopy(experiments_dict)),
                        table.copy(), LOG)
