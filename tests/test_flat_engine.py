"""The flat all-datasets scaling engine (issue 10) against the per-dataset engine it replaced.

tests/data/flat_engine/reference.npz holds the inverse scale factors, their variances and
the flags written by the per-dataset engine of commit ce46a25 (make_reference.py next to it
says how): quartz sweep, four simulated physical sweeps, thirty simulated KB stills.
"""

import importlib.util
import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.path.join(HERE, "data", "flat_engine")


def _reference_module():
    spec = importlib.util.spec_from_file_location(
        "flat_engine_reference", os.path.join(REFERENCE_DIR, "make_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _reference_module()
CASES = REFERENCE.cases()


@pytest.fixture(scope="module")
def stored():
    return np.load(os.path.join(REFERENCE_DIR, "reference.npz"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_g_equals_per_dataset_engine(name, stored):
    arguments, load = CASES[name]
    g, var_g, flag_values = REFERENCE.run_case(arguments, load)
    ref_g = stored[f"{name}_g"]
    assert g.shape == ref_g.shape
    np.testing.assert_array_equal(flag_values, stored[f"{name}_flags"])
    # Summation order may differ from the per-dataset engine; 1e-6 relative (issue 10).
    np.testing.assert_allclose(g, ref_g, rtol=1e-6, atol=0)
    # var(g) is stored as float32 (7 significant digits) and comes from an inverted normal
    # matrix, which amplifies reordering differences: 1e-4 relative.
    np.testing.assert_allclose(var_g, stored[f"{name}_var_g"], rtol=1e-4, atol=1e-12)


def test_dataset_with_nothing_to_minimise_on_is_removed_with_a_warning(caplog):
    """A sweep whose every observation is far below the selection's I/sigma > 2 window is
    suitable for scaling but gives the minimiser nothing: DIALS removes such a dataset with a
    warning; the run goes on with the others (issue 10, test 5)."""
    import copy
    import logging

    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.pipeline import run_scaling_job
    from dials_vmerge.simulate import simulate_rotation

    experiments_dict, table, _ = simulate_rotation(n_obs_target=12_000, n_sweeps=3,
                                                   model="physical", seed=2)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    table = table.copy()
    weak_id = 1
    weak_identifier = table.identifiers[weak_id]
    weak = np.asarray(table["id"]) == weak_id
    for column in ("intensity.prf.value", "intensity.sum.value"):
        values = np.array(table[column])
        values[weak] *= 1e-4  # I/sigma ~1e-3: no row passes the I/sigma > 2 preselection
        table[column] = values
    log = logging.getLogger("test_flat_engine")
    with caplog.at_level(logging.INFO, logger="test_flat_engine"):
        # quasi_random: the I/sigma preselection that leaves the weak sweep nothing (on a
        # job this small, method=auto minimises on every reflection)
        kept, scaled, summary = run_scaling_job(
            REFERENCE.scaling_params("reflection_selection.method=quasi_random"), experiments,
            table, log)
    assert [e.identifier for e in kept] == [e.identifier for e in experiments
                                           if e.identifier != weak_identifier]
    assert weak_identifier in summary["dropped_datasets"]
    assert weak_id not in set(np.unique(scaled["id"]).tolist())
    assert weak_identifier not in scaled.identifiers.values()
    assert any(f"dataset {weak_identifier}: reflection selection left nothing to minimise on"
               in record.getMessage() for record in caplog.records)
    # the other two sweeps are scaled
    from dials_vmerge import flags

    assert np.count_nonzero(scaled.get_flags(flags.scaled)) > 0.8 * scaled.nrows


def test_whole_table_preparation_equals_per_dataset_preparation():
    """Two copies of the quartz sweep in one table, both numbering partial_id from 0: the
    whole-table preparation sums partials per (dataset, partial_id) and numbers
    original_index per dataset, giving exactly the two per-dataset preparations joined."""
    from dials_vmerge.io import read_reflections
    from dials_vmerge.scaling.prepare import prepare_dataset
    from dials_vmerge.table import ReflectionTable

    path = os.path.join(HERE, "data", "dials", "quartz_processed", "integrated.refl")
    first, second = read_reflections(path), read_reflections(path)
    second["id"] = np.ones(second.nrows, dtype=np.int32)
    assert "partial_id" in first and np.any(np.bincount(
        first["partial_id"].astype(np.int64)) > 1)  # split partials exist
    both = ReflectionTable.concatenate([first.copy(), second.copy()])
    dataset_index = np.repeat([0, 1], [first.nrows, second.nrows])
    whole = prepare_dataset(both, partiality_cutoff=0.4, dataset_index=dataset_index)
    parts = [prepare_dataset(t, partiality_cutoff=0.4) for t in (first, second)]
    assert whole.nrows == sum(p.nrows for p in parts) < both.nrows
    for name in ("intensity", "variance", "partiality", "original_index", "flags",
                 "inverse_scale_factor", "intensity.sum.value", "intensity.prf.value"):
        np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]),
                                      err_msg=name)
    # grouping by partial_id alone would have summed the two copies' pieces together
    wrong = prepare_dataset(ReflectionTable.concatenate([read_reflections(path),
                                                         read_reflections(path)]),
                            partiality_cutoff=0.4)
    assert wrong.nrows < whole.nrows


def test_reruns_with_exclusions_compose_on_two_sweeps(tmp_path):
    """Issue 10 test 2: run, rerun on our output excluding the last batches of one sweep,
    rerun again excluding the last batches of the other; every run succeeds (default
    settings) and every excluded row stays flagged in the last output."""
    from dials_vmerge import flags
    from dials_vmerge.io import read_reflections
    from dials_vmerge.simulate import simulate_rotation, write_outputs

    from test_vmerge_program import run_vmerge

    experiments, table, truth = simulate_rotation(n_obs_target=8_000, n_sweeps=2,
                                                  model="physical", seed=6)
    write_outputs(experiments, table, truth, str(tmp_path / "in.expt"),
                  str(tmp_path / "in.refl"), str(tmp_path / "truth.h5"))
    last_image = int(experiments["scan"][0]["image_range"][1])
    # batch offsets: the second sweep's batches start at the next hundred (batch table)
    second_offset = 100 * (last_image // 100 + 1)
    cut = last_image - 9  # the last ten images of each sweep
    steps = [("run1", ["in.expt", "in.refl"]),
             ("run2", ["../run1/scaled.expt", "../run1/scaled.refl",
                       f"exclude_batches={cut},{last_image}"]),
             ("run3", ["../run2/scaled.expt", "../run2/scaled.refl",
                       f"exclude_batches={second_offset + cut},{second_offset + last_image}"])]
    for name, args in steps:
        work = tmp_path / name
        work.mkdir()
        args = [str(tmp_path / a[3:]) if a.startswith("../") else
                (str(tmp_path / a) if a.startswith("in.") else a) for a in args]
        result = run_vmerge(args, work)
        assert result.returncode == 0, result.stderr
    out = read_reflections(str(tmp_path / "run3" / "scaled.refl"))
    z = out["xyzobs.px.value"][:, 2]
    excluded = out.get_flags(flags.user_excluded_in_scaling)
    ids = np.asarray(out["id"])
    for dataset in np.unique(ids):
        late = (ids == dataset) & (z > cut - 1)  # image `cut` spans z in (cut - 1, cut]
        assert late.sum() > 0 and excluded[late].all(), f"dataset {dataset}"
        assert not out.get_flags(flags.scaled)[late].any()
