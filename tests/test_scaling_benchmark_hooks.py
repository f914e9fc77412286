"""The benchmark entry point: one fused physical-model target+gradient pass over every
observation, checked against an independent numpy evaluation from the models' own g and
Jacobians."""

import os

import numpy as np
import pytest

from dials_vmerge.io import read_experiments, read_reflections
from benchmark_hooks import bytes_read_per_pass, make_target_evaluator
from dials_vmerge.scaling.ih_table import map_indices_to_asu
from dials_vmerge import geometry

from conftest import DATA

QUARTZ = os.path.join(DATA, "quartz_processed")


def test_physical_pass_matches_numpy_on_quartz_and_across_nproc():
    experiments = read_experiments(os.path.join(QUARTZ, "integrated.expt"))
    table = read_reflections(os.path.join(QUARTZ, "integrated.refl"))
    # two pseudo-datasets (first and second half of the sweep), each with its own model
    second_half = table["xyzobs.px.value"][:, 2] > 50
    table["id"] = second_half.astype(np.int32)
    experiments = [experiments[0], experiments[0]]
    ev1 = make_target_evaluator(experiments, table, nproc=1)
    ok = table["intensity.sum.variance"] > 0
    assert ev1.n_obs == ok.sum()
    assert [list(m.components) for m in ev1.models] == [["scale", "decay", "absorption"]] * 2
    rng = np.random.default_rng(3)
    full = np.concatenate([m.parameter_vector() for m in ev1.models])
    full = full + rng.normal(0, 0.05, full.size)
    ev1.set_parameters(full)
    phi1, grad1 = ev1()
    assert grad1.shape == full.shape

    # independent evaluation: g and dg/dp from each model's evaluate(), sums in numpy
    i = table["intensity.sum.value"][ok]
    w = 1.0 / table["intensity.sum.variance"][ok]
    dataset = second_half[ok].astype(int)
    g = np.empty(i.size)
    jac = np.zeros((i.size, full.size))
    offset = 0
    for d, model in enumerate(ev1.models):
        rows = np.flatnonzero(dataset == d)
        gd, values, index = model.evaluate()
        g[rows] = gd
        for k in range(values.shape[1]):
            np.add.at(jac, (rows, offset + index[:, k]), values[:, k])
        offset += model.n_parameters
    asu = map_indices_to_asu(table["miller_index"][ok], geometry.space_group(experiments[0]),
                             False)
    _, group = np.unique(asu, axis=0, return_inverse=True)
    group = group.ravel()
    ih = np.bincount(group, w * g * i) / np.bincount(group, w * g * g)
    r = i - g * ih[group]
    assert phi1 == pytest.approx(np.sum(w * r * r), rel=1e-11)
    terms = (-2 * w * r * ih[group])[:, None] * jac
    expected = terms.sum(axis=0)
    assert np.all(np.abs(grad1 - expected) <= 1e-10 * np.abs(terms).sum(axis=0) + 1e-300)
    assert np.abs(expected).max() > 0

    ev2 = make_target_evaluator(experiments, table, nproc=2)
    ev2.set_parameters(full)
    phi2, grad2 = ev2()
    assert phi2 == pytest.approx(phi1, rel=1e-10)
    assert np.allclose(grad2, grad1, rtol=1e-10, atol=1e-10 * np.abs(grad1).max())
    # record (I, w, 3 scale + 3 decay weights) + 2 int32 first indices + 24 absorption
    # coefficients (doubles) + their int32 first index; one int64 offset per group (+1)
    per_obs = 64 + 2 * 4 + 24 * 8 + 4
    assert bytes_read_per_pass(ev1) == ev1.n_obs * per_obs + (ev1.n_groups + 1) * 8
