"""Selection on simulated multi-sweep data through the library scaling job (issue 4, tests 5
and 6): exclude_batches across a sweep boundary and inside a sweep, a rerun on our own output
that keeps batch numbers and composes exclusions, exclude_images in DIALS syntax,
exclude_datasets/use_datasets with ids kept, and model=KB on one dataset refused.

Three sweeps of 120 images x 0.5 degrees (60 degrees: physical model without absorption, auto
intervals 8 and 10 degrees). DIALS batch offsets: 1-120, 201-320, 401-520.

Expected smooth-parameter counts follow DIALS initialise_smooth_input (dials-scaling.md 4.3):
for a span S and interval I (+1e-5), S < 2I gives 2 or 3 parameters, otherwise
n_bins = int(S / I) + 1 and n_bins + 2 parameters with spacing S / n_bins. limit_image_range
(4.5) reuses the stored spacing as the interval for the new span. Hand-computed below.
"""

import copy
import logging

import iotbx.phil
import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.batches import batch_numbers
from dials_vmerge.cli import load_phil_text
from dials_vmerge.errors import VmergeError
from dials_vmerge.io import write_experiments, write_reflections
from dials_vmerge.io.combine import load_experiments_and_reflections
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.simulate import simulate_rotation

LOG = logging.getLogger("test_selection_simulated")
N_IMAGES = 120
OSC_WIDTH_DEG = 0.5
# Full sweep, 60 degrees. scale: interval 8 -> int(60/8) + 1 = 8 bins, spacing 7.5, 10 params;
# decay: interval 10 -> int(60/10.00001) + 1 = 6 bins, spacing 10, 8 params.
FULL_SWEEP_COUNTS = {"scale": 10, "decay": 8}
USER_EXCLUDED = flags.user_excluded_in_scaling


def scaling_params(*args):
    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    # The default error model, outlier rejection and full-matrix round are kept; only the
    # model is fixed so that the expected parameter counts hold.
    return master.fetch(
        sources=[interpreter.process(arg=a) for a in ("model=physical",) + args]).extract()


@pytest.fixture(scope="module")
def simulation():
    experiments_dict, table, truth = simulate_rotation(
        n_obs_target=15_000, n_sweeps=3, n_images=N_IMAGES, osc_width_deg=OSC_WIDTH_DEG,
        model="physical", seed=11, space_group="P 21 21 21",
        unit_cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0))
    # Partial summation deletes rows; the row number identifies rows across runs.
    table["input_row"] = np.arange(table.nrows, dtype=np.uint64)
    table["true_inverse_scale_factor"] = truth.inverse_scale_factor
    return experiments_dict, table


def run(experiments, table, *args):
    return run_scaling_job(scaling_params(*args), experiments, table, LOG)


def run_fresh(simulation, *args):
    experiments_dict, table = simulation
    return run(ExperimentList.from_dict(copy.deepcopy(experiments_dict)), table.copy(), *args)


@pytest.fixture(scope="module")
def baseline(simulation):
    """No exclusions: which rows the d-range/partiality cuts already flag user-excluded."""
    experiments, table, _ = run_fresh(simulation)
    return experiments, table


def z_obs(table):
    return table["xyzobs.px.value"][:, 2]


def excluded_by_images(table, excluded_images):
    """Rows whose z lies in no valid image: DIALS keeps a row if first - 1 <= z <= last for
    some valid range, so a row is excluded by images a..b when a - 1 < z < b, except at the
    ends of the scan where z = 0 (first image) and z = N (last image) have no neighbour."""
    z = z_obs(table)
    out = np.zeros(table.nrows, dtype=bool)
    for dataset_id, (first, last) in excluded_images:
        lower = z > first - 1 if first > 1 else z >= 0
        upper = z < last if last < N_IMAGES else z <= N_IMAGES
        out |= (table["id"] == dataset_id) & lower & upper
    return out


def baseline_flags(table, baseline_table):
    """The baseline run's user_excluded flags on the rows of `table`."""
    base = np.zeros(int(baseline_table["input_row"].max()) + 1, dtype=bool)
    base[baseline_table["input_row"].astype(np.int64)] = baseline_table.get_flags(USER_EXCLUDED)
    return base[table["input_row"].astype(np.int64)]


def assert_user_excluded_exactly(table, other_cuts, excluded_images):
    """user_excluded_in_scaling == rows in the excluded images | `other_cuts` (the rows the
    partiality cut flags without any image exclusion)."""
    by_images = excluded_by_images(table, excluded_images)
    assert by_images.sum() > 100
    flagged = table.get_flags(USER_EXCLUDED)
    expected = by_images | other_cuts
    wrong = np.flatnonzero(flagged != expected)
    assert wrong.size == 0, (
        f"{wrong.size} rows with the wrong user_excluded_in_scaling flag, e.g. id "
        f"{table['id'][wrong[:5]]} z {z_obs(table)[wrong[:5]]}")
    assert not table.get_flags(flags.scaled)[by_images].any()
    assert table.get_flags(flags.scaled)[~expected].mean() > 0.95


def model_of(experiments, index):
    return experiments[index].scaling_model


def smooth_counts(model_dict):
    return {name: model_dict[name]["n_parameters"] for name in ("scale", "decay")}


def test_baseline_layout(baseline):
    experiments, table = baseline
    assert [e.scan["batch_offset"] for e in experiments] == [0, 200, 400]
    b = batch_numbers(table, experiments)
    for dataset_id, (lo, hi) in enumerate([(1, 120), (201, 320), (401, 520)]):
        in_dataset = b[table["id"] == dataset_id]
        assert in_dataset.min() == lo and in_dataset.max() == hi
    for index in range(3):
        model = model_of(experiments, index)
        assert model["configuration_parameters"]["valid_image_range"] == [1, N_IMAGES]
        assert model["configuration_parameters"]["corrections"] == ["scale", "decay"]
        assert smooth_counts(model) == FULL_SWEEP_COUNTS


@pytest.fixture(scope="module")
def batch_run(simulation):
    # 111-210: images 111-120 of sweep 0 and 1-10 of sweep 1 (across the sweep boundary);
    # 251-260: images 51-60 of sweep 1 (a gap inside one sweep); 401-440: the first third
    # of sweep 2 (the smoothers lose leading parameters).
    experiments, table, _ = run_fresh(simulation, "exclude_batches=111,210",
                                      "exclude_batches=251,260", "exclude_batches=401,440")
    return experiments, table


def test_exclude_batches_across_a_boundary_and_inside_a_sweep(batch_run, baseline):
    experiments, table = batch_run
    assert_user_excluded_exactly(table, baseline_flags(table, baseline[1]),
                                 [(0, (111, 120)), (1, (1, 10)), (1, (51, 60)), (2, (1, 40))])
    ranges = [e.scan["valid_image_ranges"][e.identifier] for e in experiments]
    assert ranges == [[[1, 110]], [[11, 50], [61, 120]], [[41, 120]]]
    conf = [model_of(experiments, i)["configuration_parameters"] for i in range(3)]
    # Only the envelope limits the model; the interior gap of sweep 1 does not.
    assert [c["valid_image_range"] for c in conf] == [[1, 110], [11, 120], [41, 120]]
    assert conf[0]["valid_osc_range"] == pytest.approx([0.0, 55.0])
    assert conf[1]["valid_osc_range"] == pytest.approx([5.0, 60.0])
    # 55 degrees with the stored spacings 7.5 and 10: int(55/7.5) + 1 = 8 bins -> 10 scale
    # parameters at spacing 55/8; int(55/10) + 1 = 6 bins -> 8 decay parameters at 55/6.
    for c in conf[:2]:
        assert c["scale_rot_interval"] == pytest.approx(55.0 / 8)
        assert c["decay_rot_interval"] == pytest.approx(55.0 / 6)
        assert c["s_norm_fac"] == pytest.approx(0.999 * OSC_WIDTH_DEG / (55.0 / 8))
    assert [smooth_counts(model_of(experiments, i)) for i in range(2)] == [FULL_SWEEP_COUNTS] * 2
    # Sweep 2, images 41-120: 40 degrees from 20 to 60. int(40/7.5) + 1 = 6 bins -> 8 scale
    # parameters at spacing 40/6; int(40/10.00001) + 1 = 4 bins -> 6 decay parameters.
    assert conf[2]["valid_osc_range"] == pytest.approx([20.0, 60.0])
    assert conf[2]["s_norm_fac"] == pytest.approx(0.999 * OSC_WIDTH_DEG / (40.0 / 6))
    assert conf[2]["d_norm_fac"] == pytest.approx(0.999 * OSC_WIDTH_DEG / 10.0)
    assert smooth_counts(model_of(experiments, 2)) == {"scale": 8, "decay": 6}
    # Batch numbers never change.
    assert [e.scan["batch_offset"] for e in experiments] == [0, 200, 400]


def test_limited_models_still_recover_the_true_scales(batch_run):
    """The re-fitted, limited smoothers (sweep 2 starts at image 41, i.e. at normalised
    coordinate ~3 where DIALS drops the two leading parameters) describe the truth; g is
    compared after the global K and exp(B/2d^2) the data cannot determine (see
    test_truth_recovery.py)."""
    experiments, table = batch_run
    scaled = table.get_flags(flags.scaled)
    log_ratio = np.log(table["inverse_scale_factor"][scaled]
                       / table["true_inverse_scale_factor"][scaled])
    half_dstar_sq = 0.5 / table["d"][scaled] ** 2
    design = np.stack([np.ones_like(half_dstar_sq), half_dstar_sq], axis=1)
    residual = log_ratio - design @ np.linalg.lstsq(design, log_ratio, rcond=None)[0]
    for dataset_id in range(3):
        rows = table["id"][scaled] == dataset_id
        error = float(np.sqrt(np.mean(np.expm1(residual[rows]) ** 2)))
        assert error < 0.02, f"dataset {dataset_id}: RMS relative error of g {error:.4f}"


def test_excluding_the_last_third_shrinks_the_smoothers(simulation, baseline):
    # exclude_images in DIALS syntax ("id:first:last"), images 81-120 of sweep 0.
    experiments, table, _ = run_fresh(simulation, "exclude_images=0:81:120")
    assert_user_excluded_exactly(table, baseline_flags(table, baseline[1]), [(0, (81, 120))])
    conf = model_of(experiments, 0)["configuration_parameters"]
    assert conf["valid_image_range"] == [1, 80]
    assert conf["valid_osc_range"] == pytest.approx([0.0, 40.0])
    # 40 degrees: int(40/7.5) + 1 = 6 bins -> 8 scale parameters (was 10);
    # int(40/10.00001) + 1 = 4 bins -> 6 decay parameters (was 8).
    assert smooth_counts(model_of(experiments, 0)) == {"scale": 8, "decay": 6}
    assert smooth_counts(model_of(experiments, 1)) == FULL_SWEEP_COUNTS
    # The same images given as global batches give the same selection.
    experiments_b, table_b, _ = run_fresh(simulation, "exclude_batches=81,120")
    assert np.array_equal(table_b.get_flags(USER_EXCLUDED), table.get_flags(USER_EXCLUDED))
    assert model_of(experiments_b, 0)["configuration_parameters"]["valid_image_range"] == [1, 80]


def test_exclude_images_uses_the_sweeps_own_image_numbers(simulation):
    """'2:1:30' is images 1-30 of dataset id 2 (batches 401-430), not batch numbers."""
    from dials_vmerge.pipeline import select

    experiments_dict, table = simulation
    results = []
    for arg in ("exclude_images=2:1:30", "exclude_batches=401,430"):
        experiments, selected, changed = select(
            scaling_params(arg), ExperimentList.from_dict(copy.deepcopy(experiments_dict)),
            table.copy(), LOG)
        results.append((selected.get_flags(USER_EXCLUDED), changed,
                        experiments[2].scan["valid_image_ranges"][experiments[2].identifier]))
    assert np.array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1] == {2: (31, 120)}
    assert results[0][2] == results[1][2] == [[31, 120]]


def test_rerun_on_our_output_keeps_batches_and_composes(batch_run, baseline, tmp_path):
    experiments, table = batch_run
    write_experiments(experiments, str(tmp_path / "scaled.expt"))
    write_reflections(table, str(tmp_path / "scaled.refl"))
    experiments_2, table_2 = load_experiments_and_reflections(
        [str(tmp_path / "scaled.expt")], [str(tmp_path / "scaled.refl")])
    batches_before = batch_numbers(table_2, experiments_2)
    # Images 81-120 of sweep 1, by the batch numbers of the first run (281-320).
    experiments_2, table_2, _ = run(experiments_2, table_2, "exclude_batches=281,320")
    assert [e.scan["batch_offset"] for e in experiments_2] == [0, 200, 400]
    assert np.array_equal(batch_numbers(table_2, experiments_2), batches_before)
    ranges = [e.scan["valid_image_ranges"][e.identifier] for e in experiments_2]
    assert ranges == [[[1, 110]], [[11, 50], [61, 80]], [[41, 120]]]
    # A rerun keeps the first run's preparation exclusions (scaling/rerun.py: the partiality
    # cut was judged on the partial pieces there, and our output holds the summed rows) and
    # adds the new image exclusions; nothing else is user-excluded.
    first_run_user_excluded = table.get_flags(USER_EXCLUDED)
    assert_user_excluded_exactly(
        table_2, first_run_user_excluded,
        [(0, (111, 120)), (1, (1, 10)), (1, (51, 60)), (1, (81, 120)), (2, (1, 40))])
    conf = [model_of(experiments_2, i)["configuration_parameters"] for i in range(3)]
    assert [c["valid_image_range"] for c in conf] == [[1, 110], [11, 80], [41, 120]]
    assert conf[1]["valid_osc_range"] == pytest.approx([5.0, 40.0])
    # Sweep 1 is limited again from its stored model: 35 degrees with the stored spacings
    # 55/8 and 55/6: int(35 / 6.875) + 1 = 6 bins -> 8 scale parameters;
    # int(35 / 9.1667) + 1 = 4 bins -> 6 decay parameters.
    assert smooth_counts(model_of(experiments_2, 1)) == {"scale": 8, "decay": 6}
    assert smooth_counts(model_of(experiments_2, 0)) == FULL_SWEEP_COUNTS
    assert smooth_counts(model_of(experiments_2, 2)) == {"scale": 8, "decay": 6}


@pytest.mark.parametrize("selection", ["exclude_datasets=1", "use_datasets=0,2"])
def test_dataset_selection_removes_experiments_and_keeps_ids(simulation, selection):
    experiments_dict, table = simulation
    identifiers = [e["identifier"] for e in experiments_dict["experiment"]]
    experiments, scaled, _ = run_fresh(simulation, selection)
    assert [e.identifier for e in experiments] == [identifiers[0], identifiers[2]]
    assert sorted(set(scaled["id"].tolist())) == [0, 2]
    assert scaled.identifiers == {0: identifiers[0], 2: identifiers[2]}
    for dataset_id in (0, 2):
        rows = scaled["id"] == dataset_id
        assert rows.sum() > 0 and scaled.get_flags(flags.scaled)[rows].mean() > 0.9
        # every input row of the dataset is present (less the summed partial pieces)
        inputs = table["input_row"][table["id"] == dataset_id]
        assert np.isin(scaled["input_row"][rows], inputs).all()
    for e in experiments:
        assert e.scaling_model["__id__"] == "physical"


def test_kb_on_one_dataset_is_a_clear_error(simulation):
    # Its single K is degenerate with the merged intensities.
    with pytest.raises(VmergeError, match="model=KB.*single dataset"):
        run_fresh(simulation, "use_datasets=1", "model=KB")
    # with two datasets KB is fine (runs to the end)
    experiments, _, _ = run_fresh(simulation, "use_datasets=0,1", "model=KB")
    assert [e.scaling_model["__id__"] for e in experiments] == ["KB", "KB"]


def test_dataset_removed_during_scaling_is_absent_from_the_output(simulation, tmp_path):
    """Dataset 1 has nothing suitable after the partiality cut, so scaling drops it (DIALS);
    the output experiments and the table's identifiers no longer name it, ids are kept, and
    the written pair reads back."""
    experiments_dict, table = simulation
    table = table.copy()
    partiality = table["partiality"].copy()
    partiality[table["id"] == 1] = 0.1
    table["partiality"] = partiality
    experiments, scaled, summary = run(
        ExperimentList.from_dict(copy.deepcopy(experiments_dict)), table)
    identifiers = [e["identifier"] for e in experiments_dict["experiment"]]
    assert summary["dropped_datasets"] == [identifiers[1]]
    assert [e.identifier for e in experiments] == [identifiers[0], identifiers[2]]
    assert sorted(set(scaled["id"].tolist())) == [0, 2]
    assert scaled.identifiers == {0: identifiers[0], 2: identifiers[2]}
    write_experiments(experiments, str(tmp_path / "scaled.expt"))
    write_reflections(scaled, str(tmp_path / "scaled.refl"))
    reread, reread_table = load_experiments_and_reflections(
        [str(tmp_path / "scaled.expt")], [str(tmp_path / "scaled.refl")])
    assert [e.identifier for e in reread] == [identifiers[0], identifiers[2]]
    assert reread_table.identifiers == {0: identifiers[0], 2: identifiers[2]}
