"""The fused physical-model target pass equals the generic ELL pass (models' own Jacobians)."""

import os

import numpy as np
import pytest

from dials_vmerge import flags, geometry
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.model.factory import create_scaling_model, default_model_params
from dials_vmerge.scaling.family import DatasetByDataset
from dials_vmerge.scaling.ih_table import build_ih_table, map_indices_to_asu
from dials_vmerge.scaling.parameters import ParameterManager
from dials_vmerge.scaling.physical_pass import uses_fused_physical_pass
from dials_vmerge.scaling.target import ScalingTarget

from conftest import DATA

QUARTZ = os.path.join(DATA, "quartz_processed")
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def quartz():
    t = read_reflections(os.path.join(QUARTZ, "integrated.refl"))
    e = read_experiments(os.path.join(QUARTZ, "integrated.expt"))[0]
    good = ((t["flags"] & flags.integrated_sum) != 0) & (t["d"] > 0) & (
        t["intensity.sum.variance"] > 0)
    t = t.select(good)
    t["analytical_correction"] = RNG.uniform(0.9, 1.1, t.nrows)
    return t, e


def _targets(quartz, nproc=1, fix_initial=None, **overrides):
    """(fused target, generic target, x) over two pseudo-datasets (the two sweep halves)."""
    table, expt = quartz
    halves = [table["xyzobs.px.value"][:, 2] <= 50, table["xyzobs.px.value"][:, 2] > 50]
    models, asus, intensities, variances = [], [], [], []
    for half in halves:
        sub = table.select(half)
        model = create_scaling_model(default_model_params(**overrides), expt, sub)
        model.configure(sub, expt)
        p = model.parameter_vector()
        model.set_parameter_vector(p + RNG.normal(0, 0.05, p.size))
        models.append(model)
        asus.append(map_indices_to_asu(sub["miller_index"], geometry.space_group(expt), False))
        intensities.append(sub["intensity.sum.value"])
        variances.append(sub["intensity.sum.variance"])
    ih = build_ih_table(asus, intensities, variances, [1.0 / v for v in variances],
                        [np.ones(v.size) for v in variances])
    manager = ParameterManager(models, fix_initial)
    fused = ScalingTarget(manager, ih, nproc)
    generic = ScalingTarget(manager, ih, nproc)
    generic.fused = None
    # the models' own Jacobians (components and product rule), not the family kernel that
    # reads the fused pass's inputs
    generic._families = DatasetByDataset(manager, range(len(models)), ih.dataset_id,
                                         ih.loc_index)
    return fused, generic, manager.get_free()


@pytest.mark.parametrize("overrides", [
    {},
    {"physical__share": type("S", (), {"absorption": True})()},
    {"physical__correction": type("C", (), {"fix": ["decay"]})()},
    {"physical__scale_interval": 500.0, "physical__decay_interval": 500.0},  # 2-3 params
    {"physical__analytical_correction": True, "physical__absorption_correction": False},
])
def test_fused_pass_equals_generic_pass(quartz, overrides):
    fused, generic, x = _targets(quartz, **overrides)
    assert fused.fused is not None
    phi_f, grad_f = fused.value_and_gradient(x)
    phi_g, grad_g = generic.value_and_gradient(x)
    assert phi_f == pytest.approx(phi_g, rel=1e-12)
    scale = np.abs(grad_g).max()
    assert scale > 0
    assert np.abs(grad_f - grad_g).max() <= 1e-11 * scale
    # the gradient is the derivative of phi (central differences on a few parameters)
    for j in RNG.choice(x.size, 4, replace=False):
        step = 1e-6 * max(1.0, abs(x[j]))
        up = x.copy(); up[j] += step
        down = x.copy(); down[j] -= step
        fd = (fused.value_and_gradient(up)[0] - fused.value_and_gradient(down)[0]) / (2 * step)
        assert fd == pytest.approx(grad_f[j], rel=1e-4, abs=1e-6 * scale)


def test_fused_pass_with_first_scale_parameter_fixed_and_across_nproc(quartz, monkeypatch):
    import numba

    from dials_vmerge.backends import block_sums
    from dials_vmerge.scaling.ih_table import set_num_threads

    # quartz is one block at the default size: smaller blocks so that threads share several
    monkeypatch.setattr(block_sums, "MIN_BLOCK_OBSERVATIONS", 256)

    threads_before = numba.get_num_threads()
    fused1, generic1, x = _targets(quartz, nproc=1, fix_initial=0)
    phi1, grad1 = fused1.value_and_gradient(x)
    phi_g, grad_g = generic1.value_and_gradient(x)
    assert grad1.size == grad_g.size == fused1.manager.n_free
    assert np.abs(grad1 - grad_g).max() <= 1e-11 * np.abs(grad_g).max()
    try:
        set_num_threads(2)
        fused2 = ScalingTarget(fused1.manager, fused1.table, 2)
        assert fused2.block_bounds.size - 1 >= 2  # the two threads share the blocks
        phi2, grad2 = fused2.value_and_gradient(x)
    finally:
        set_num_threads(threads_before)
    # fixed blocks of the data added as a tree (backends/block_sums.py): nproc changes no bit
    assert phi2 == phi1
    assert np.array_equal(grad2, grad1)
    assert fused1.value_and_gradient(x)[0] == phi1  # same nproc: identical numbers


def test_models_with_different_components_use_the_generic_pass(quartz):
    table, expt = quartz
    with_abs = create_scaling_model(default_model_params(), expt, table)
    params = default_model_params()
    params.physical.absorption_correction = False
    without = create_scaling_model(params, expt, table)
    kb = create_scaling_model(default_model_params(model="KB"), expt, table)
    assert uses_fused_physical_pass([with_abs, with_abs])
    assert not uses_fused_physical_pass([with_abs, without])
    assert not uses_fused_physical_pass([kb])


def test_fused_pass_without_scale_or_decay_term(quartz):
    for overrides in ({"physical__scale_correction": False},
                      {"physical__decay_correction": False}):
        fused, generic, x = _targets(quartz, **overrides)
        phi_f, grad_f = fused.value_and_gradient(x)
        phi_g, grad_g = generic.value_and_gradient(x)
        assert phi_f == pytest.approx(phi_g, rel=1e-12)
        assert np.abs(grad_f - grad_g).max() <= 1e-11 * np.abs(grad_g).max()
