"""The benchmark harness (benchmarks/run.py): its accuracy measures and its records."""

import importlib.util
import json
import os

import numpy as np
import pytest
from cctbx import crystal

from dials_vmerge import flags
from dials_vmerge.io import write_reflections
from dials_vmerge.simulate import simulate_rotation

HARNESS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_run", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_error_removes_the_overall_scale(harness):
    g_true = np.array([1.0, 2.0, 0.5, 1.5])
    assert harness.scale_rms_rel_error(3.0 * g_true, g_true) == pytest.approx(0.0, abs=1e-15)
    # ratios 1.1 and 0.9 / 1.1 * 0.9 geometric mean sqrt(0.99): hand-computed RMS
    ratio = np.array([1.1, 0.9, 1.1, 0.9])
    c = np.sqrt(0.99)
    expected = np.sqrt(np.mean((ratio / c - 1) ** 2))
    assert harness.scale_rms_rel_error(2.0 * ratio * g_true, g_true) == pytest.approx(expected, rel=1e-12)


def test_accuracy_reads_a_scaled_table_against_the_truth(harness, tmp_path):
    """A fake scaled.refl with g = 1.7 x truth x (1 +- 2%) gives a 2% error and a high CC."""
    experiments, table, truth = simulate_rotation(n_obs_target=20000, seed=9, mean_i_over_sigma=20)
    rng = np.random.default_rng(0)
    noise = 0.02 * rng.choice([-1.0, 1.0], table.nrows)
    table["inverse_scale_factor"] = 1.7 * truth.inverse_scale_factor * (1 + noise)
    c = table["lp"] / table["qe"]
    table["intensity.scale.value"] = table["intensity.prf.value"] * c
    table["intensity.scale.variance"] = table["intensity.prf.variance"] * c * c
    ok = table.get_flags(flags.integrated_prf)
    table.set_flags(ok, flags.scaled)
    table["original_index"] = np.arange(table.nrows, dtype=np.uint64)
    write_reflections(table, str(tmp_path / "scaled.refl"))
    symmetry = crystal.symmetry(unit_cell=truth.structure.unit_cell,
                                space_group=truth.structure.space_group)
    rms, cc, source, notes = harness.accuracy(str(tmp_path), truth, symmetry)
    assert rms == pytest.approx(0.02, rel=0.05)
    assert source.startswith("scaled.refl")
    assert 0.95 < cc <= 1.0
    # the truth's own merged intensities correlate perfectly with themselves
    assert harness.merged_cc(truth.miller_index, truth.intensity, truth.miller_index,
                             truth.intensity, symmetry) == pytest.approx(1.0)


def test_harness_writes_records_with_the_required_fields(harness, tmp_path):
    out = tmp_path / "results.json"
    assert harness.main(["--sizes", "3e3", "--repeats", "2", "--out", str(out),
                         "--workdir", str(tmp_path / "work")]) == 0
    records = json.loads(out.read_text())["records"]
    assert len(records) == 1
    record = records[0]
    for key in ("n_obs", "eval_seconds", "bound_seconds", "ratio_to_bound", "end_to_end_seconds",
                "peak_rss_bytes_per_obs", "scale_rms_rel_error", "merged_cc_to_truth"):
        assert key in record, key
    assert 2000 < record["n_obs"] < 4500
    assert record["bound_seconds"] > 0
    # fields that could not be measured are null and explained
    for key in ("eval_seconds", "end_to_end_seconds"):
        if record[key] is None:
            assert record["notes"]
    if record["eval_seconds"] is not None:
        assert record["ratio_to_bound"] == pytest.approx(record["eval_seconds"] / record["bound_seconds"])
