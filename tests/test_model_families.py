"""Model families (scaling/family.py): g and dg/dp of all rows of all datasets of a family in
one kernel call equal each model's own evaluation (its components and the product rule,
model/base.py), dataset by dataset; also for jobs that mix families and for g and var(g) of
every configured row (the expand step)."""

import copy

import numpy as np
import pytest

import dials_vmerge  # noqa: F401
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.model.factory import create_scaling_model, default_model_params
from dials_vmerge.scaling.family import DatasetByDataset, ModelFamilies, evaluate_all_rows
from dials_vmerge.scaling.parameters import ParameterManager
from dials_vmerge.simulate import simulate_rotation

RNG = np.random.default_rng(11)
N_SWEEPS = 4


@pytest.fixture(scope="module")
def sweeps():
    """Four simulated 2-3k-observation sweeps: experiments and one table per sweep."""
    experiments_dict, table, _ = simulate_rotation(n_obs_target=9000, n_sweeps=N_SWEEPS,
                                                   model="physical", seed=5)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    ids = np.asarray(table["id"])
    tables = []
    for k in range(N_SWEEPS):
        sub = table.select((ids == k) & (np.asarray(table["d"]) > 0))
        sub["analytical_correction"] = RNG.uniform(0.9, 1.1, sub.nrows)
        tables.append(sub)
    return experiments, tables


def _models(sweeps, settings):
    """One configured model per sweep (settings[k]: default_model_params overrides), with
    parameters moved off their initial values so that every derivative matters."""
    experiments, tables = sweeps
    models = []
    for expt, sub, overrides in zip(experiments, tables, settings):
        model = create_scaling_model(default_model_params(**overrides), expt, sub)
        model.configure(sub, expt)
        p = model.parameter_vector()
        model.set_parameter_vector(p + RNG.normal(0.0, 0.05, p.size))
        models.append(model)
    return models


def _rows(models, fraction=0.7):
    """A table's view of the datasets: a random subset of each model's configured rows
    (some twice) in a shuffled order, as (row_dataset, local_row)."""
    dataset, local = [], []
    for d, model in enumerate(models):
        chosen = np.flatnonzero(RNG.random(model.n_configured) < fraction)
        chosen = np.concatenate([chosen, chosen[:5]])
        dataset.append(np.full(chosen.size, d))
        local.append(chosen)
    order = RNG.permutation(sum(a.size for a in dataset))
    return np.concatenate(dataset)[order], np.concatenate(local)[order]


def _dense(values, cols, n_free):
    jacobian = np.zeros((values.shape[0], n_free))
    used = cols >= 0
    np.add.at(jacobian, (np.nonzero(used)[0], cols[used]), values[used])
    return jacobian


def _own_evaluation(manager, row_dataset, local_row):
    """Independent reference: each model's own evaluate(rows=...) (its components and the
    product rule), placed row by row; its Jacobian over the free columns, dense."""
    n = row_dataset.size
    g = np.empty(n)
    jacobian = np.zeros((n, manager.n_free))
    for d, model in enumerate(manager.models):
        mine = np.flatnonzero(row_dataset == d)
        if not mine.size:
            continue
        g_d, values, index = model.evaluate(rows=local_row[mine])
        g[mine] = g_d
        cols = np.asarray(manager.column_of_parameter[d])[index]
        cols[values == 0.0] = -1  # padding slots
        jacobian[mine] = _dense(values, cols, manager.n_free)
    return g, jacobian


def _check(manager, row_dataset, local_row, expected_families):
    x = manager.get_free()
    manager.set_free(x)  # a shared component: one value in every dataset, as in a run
    families = ModelFamilies(manager, row_dataset, local_row)
    assert [type(f).__name__ for f, _ in families.families] == expected_families
    g, values, cols = families.evaluate(x)
    g_ref, jacobian_ref = _own_evaluation(manager, row_dataset, local_row)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=0)
    jacobian = _dense(values, cols, manager.n_free)
    assert np.abs(jacobian_ref).max() > 0
    np.testing.assert_allclose(jacobian, jacobian_ref, rtol=0,
                               atol=1e-12 * np.abs(jacobian_ref).max())
    np.testing.assert_array_equal(families.evaluate_g(x), g)
    # the free vector, not the models' stored parameters, decides: a moved x moves g
    moved = x + RNG.normal(0.0, 0.01, x.size)
    manager.set_free(moved)
    g_moved_ref, _ = _own_evaluation(manager, row_dataset, local_row)
    manager.set_free(x)
    np.testing.assert_allclose(families.evaluate_g(moved), g_moved_ref, rtol=1e-12, atol=0)
    return families


ABSORPTION = {"physical__absorption_correction": True}


@pytest.mark.parametrize("settings, fix_initial", [
    ([ABSORPTION] * N_SWEEPS, None),
    ([ABSORPTION] * N_SWEEPS, 0),  # first scale parameter of dataset 0 fixed
    ([{**ABSORPTION, "physical__share": type("S", (), {"absorption": True})()}] * N_SWEEPS,
     None),  # one absorption surface for all datasets (shared free columns)
    ([{"physical__absorption_correction": False, "physical__analytical_correction": True,
       "physical__correction": type("C", (), {"fix": ["decay"]})()}] * N_SWEEPS, None),
    ([{"physical__absorption_correction": False, "physical__scale_interval": 500.0,
       "physical__decay_interval": 500.0}] * N_SWEEPS, None),  # 2-3 smoother parameters
    ([{"physical__absorption_correction": False, "physical__decay_correction": False}]
     * N_SWEEPS, None),
    ([{"model": "dose_decay"}] * N_SWEEPS, 0),  # shared dose rate C
    ([{"model": "dose_decay", "dose_decay__absorption_correction": True,
       "dose_decay__share": type("S", (), {"decay": False})(),
       "dose_decay__analytical_correction": True}] * N_SWEEPS, None),
    ([{"model": "dose_decay", "dose_decay__relative_B_correction": False}] * N_SWEEPS, None),
    ([{"model": "dose_decay", "dose_decay__decay_correction": False}] * N_SWEEPS, None),
])
def test_smooth_rotation_family_equals_each_models_own_evaluation(sweeps, settings,
                                                                    fix_initial):
    models = _models(sweeps, settings)
    manager = ParameterManager(models, fix_initial)
    row_dataset, local_row = _rows(models)
    _check(manager, row_dataset, local_row, ["SmoothRotationFamily"])


ARRAY = {"model": "array"}
MODULATION = {"model": "array", "array__modulation_correction": True}


@pytest.mark.parametrize("settings, expected", [
    ([ARRAY] * N_SWEEPS, ["ArrayFamily"]),
    ([MODULATION] * N_SWEEPS, ["ArrayFamily"]),
    # datasets with different grids: decay only, absorption only, all three + analytical
    ([ARRAY, {"model": "array", "array__absorption_correction": False},
      {"model": "array", "array__decay_correction": False},
      {**MODULATION, "array__analytical_correction": True,
       "array__correction": type("C", (), {"fix": ["modulation"]})()}], ["ArrayFamily"]),
    # KB, physical (with absorption), dose_decay (without) and array datasets in one job
    ([{"model": "KB"}, ABSORPTION, {"model": "dose_decay"}, ARRAY],
     ["KBFamily", "SmoothRotationFamily", "SmoothRotationFamily", "ArrayFamily"]),
])
def test_array_family_and_mixed_jobs_one_call_per_family(sweeps, settings, expected):
    models = _models(sweeps, settings)
    manager = ParameterManager(models)
    row_dataset, local_row = _rows(models)
    families = _check(manager, row_dataset, local_row, expected)
    # each family got only its own rows, together all rows once
    if len(expected) > 1:
        rows = np.sort(np.concatenate([r for _, r in families.families]))
        np.testing.assert_array_equal(rows, np.arange(row_dataset.size))


def test_dataset_by_dataset_fallback_is_each_models_own_evaluation(sweeps):
    models = _models(sweeps, [ARRAY, ABSORPTION, {"model": "KB"}, ARRAY])
    manager = ParameterManager(models)
    row_dataset, local_row = _rows(models)
    fallback = DatasetByDataset(manager, range(len(models)), row_dataset, local_row)
    x = manager.get_free()
    g, values, cols = fallback.evaluate(x)
    g_ref, jacobian_ref = _own_evaluation(manager, row_dataset, local_row)
    np.testing.assert_array_equal(g, g_ref)
    np.testing.assert_array_equal(fallback.evaluate_g(x), g_ref)
    np.testing.assert_allclose(_dense(values, cols, manager.n_free), jacobian_ref, rtol=0,
                               atol=1e-15 * np.abs(jacobian_ref).max())


def test_all_rows_g_and_variance_of_g(sweeps, monkeypatch):
    """expand's evaluation: g and var(g) = diag(J C J^T) of every configured row, in
    blocks that cross dataset boundaries, equal the models' own g and a dense J C J^T."""
    from dials_vmerge.scaling import family
    from dials_vmerge.scaling.target import variance_of_g

    monkeypatch.setattr(family, "G_BLOCK_ROWS", 1000)  # blocks straddle datasets
    monkeypatch.setattr(family, "DERIVATIVE_BLOCK_ROWS", 700)
    settings = [ABSORPTION, ARRAY, {"model": "KB"}, {"model": "dose_decay"}]
    models = _models(sweeps, settings)
    manager = ParameterManager(models, 0)
    manager.set_free(manager.get_free())
    sizes = [m.n_configured for m in models]
    row_dataset = np.repeat(np.arange(len(models)), sizes)
    local_row = np.concatenate([np.arange(n) for n in sizes])
    g_ref, jacobian = _own_evaluation(manager, row_dataset, local_row)
    root = RNG.normal(size=(manager.n_free, manager.n_free)) * 1e-3
    covariance = root @ root.T
    var_ref = np.einsum("ij,jk,ik->i", jacobian, covariance, jacobian)

    g, none = evaluate_all_rows(manager, sizes)
    assert none is None
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=0)
    g2, var_g = evaluate_all_rows(manager, sizes, covariance, variance_of_g)
    # g alone comes from the smoothers' coordinates, g with derivatives from the ELL
    # weights: the same products in another association, so to rounding
    np.testing.assert_allclose(g2, g, rtol=1e-14, atol=0)
    # var(g) sums diag + 2 x off-diagonal terms per row where einsum sums all (k, k') in its
    # own order: the same terms, other rounding. No cancellation to amplify it (measured
    # |var| >= 0.36 x sum of |terms| on every row), so it stays at a few ulp: the largest
    # relative difference measured is 4.4e-15 (~20 ulp, 9923 rows, seed 11); rtol 2e-14
    # leaves a 4.5x margin for another summation order in the kernel.
    np.testing.assert_allclose(var_g, var_ref, rtol=2e-14, atol=0)
    for model, start, stop in zip(models, np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)):
        np.testing.assert_allclose(g[start:stop], model.evaluate_g(), rtol=1e-12, atol=0)


def test_friedel_hand_of_a_multi_dataset_table(sweeps):
    """The likelihood target's Friedel hand per observation of an Ih table, taken for all
    datasets at once, equals a per-dataset recomputation from each observation's row."""
    from types import SimpleNamespace

    from dials_vmerge import geometry
    from dials_vmerge.scaling.algorithm import ScalingRun
    from dials_vmerge.scaling.ih_table import build_ih_table, map_indices_to_asu
    from dials_vmerge.table import ReflectionTable

    experiments, tables = sweeps
    table = ReflectionTable.concatenate([t.copy() for t in tables])
    bounds = np.cumsum([0] + [t.nrows for t in tables])
    space_group = geometry.space_group(experiments[0])
    states = []
    for k in range(N_SWEEPS):  # every other row of each dataset is "suitable"
        states.append(SimpleNamespace(suitable_rows=np.arange(bounds[k], bounds[k + 1], 2)))
    asus = [map_indices_to_asu(table["miller_index"][s.suitable_rows], space_group, False)
            for s in states]
    ones = [np.ones(s.suitable_rows.size) for s in states]
    ih = build_ih_table(asus, ones, ones, ones, ones)
    run = SimpleNamespace(states=states, table=table, space_group=space_group)
    hand = ScalingRun._friedel_hand(run, ih)
    expected = np.empty(ih.n_obs, dtype=np.int64)
    for i in range(ih.n_obs):
        row = states[ih.dataset_id[i]].suitable_rows[ih.loc_index[i]]
        hkl = table["miller_index"][row:row + 1]
        expected[i] = np.any(map_indices_to_asu(hkl, space_group, False)
                             != map_indices_to_asu(hkl, space_group, True))
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(hand, expected)


def test_g_alone_at_other_absorption_parameters_is_refused(sweeps):
    """The g-alone family takes absorption values at the models' parameters: asked at
    other absorption parameters it refuses rather than give a wrong g."""
    models = _models(sweeps, [ABSORPTION] * 2)
    manager = ParameterManager(models)
    sizes = [m.n_configured for m in models]
    row_dataset = np.repeat(np.arange(2), sizes)
    local_row = np.concatenate([np.arange(n) for n in sizes])
    families = ModelFamilies(manager, row_dataset, local_row, g_only=True)
    x = manager.get_free()
    g_ref, _ = _own_evaluation(manager, row_dataset, local_row)
    np.testing.assert_allclose(families.evaluate_g(x), g_ref, rtol=1e-12, atol=0)
    absorption = models[0].parameter_slices()["absorption"]
    moved = x.copy()
    moved[manager.column_of_parameter[0][absorption.start]] += 0.01
    with pytest.raises(ValueError, match="absorption values"):
        families.evaluate_g(moved)


def test_fused_variance_of_one_smooth_rotation_family_equals_the_derivative_table(sweeps):
    """expand's var(g) of a job whose datasets are all physical: the family's fused kernel
    (no derivative table) gives the bits of its ELL table followed by variance_of_g."""
    from dials_vmerge.scaling.target import variance_of_g

    models = _models(sweeps, [ABSORPTION, {}, ABSORPTION, ABSORPTION])
    models = [models[0], models[2], models[3]]  # one absorption width: one family
    manager = ParameterManager(models, 0)
    row_dataset, local_row = _rows(models)
    families = ModelFamilies(manager, row_dataset, local_row)
    assert len(families.families) == 1
    root = RNG.normal(size=(manager.n_free, manager.n_free)) * 1e-3
    covariance = root @ root.T
    x = manager.get_free()
    g, var_g = families.evaluate_variance(x, covariance, variance_of_g)
    g_table, values, cols = families.evaluate(x)
    np.testing.assert_array_equal(g, g_table)
    np.testing.assert_array_equal(var_g, variance_of_g(values, cols, covariance))
    assert np.all(var_g > 0)
