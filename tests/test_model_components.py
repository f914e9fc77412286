"""Components and models: derivatives against finite differences, the product rule, the
spherical-harmonic basis against closed forms, and var(g) against a dense J Sigma J^T."""

import math

import dials_vmerge  # noqa: F401  (import order: cctbx before numba/scipy)
import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.model import create_scaling_model, default_model_params, variance_of_g
from dials_vmerge.model.absorption_sh import (
    SHAbsorption,
    lookup_index,
    real_harmonics,
    sph_harm_coefficients,
    sph_harm_coefficients_lookup,
    sph_harm_lookup_table,
    theta_phi,
)
from dials_vmerge.model.array_grid import SmoothGrid2D, SmoothGrid3D
from dials_vmerge.model.decay_smooth import DecaySmooth1D
from dials_vmerge.model.kb import SingleB, SingleScale
from dials_vmerge.model.scale_smooth import ScaleSmooth1D

from conftest import data_path

RNG = np.random.default_rng(7)


def dense(dv, di, n_par):
    out = np.zeros((dv.shape[0], n_par))
    for r in range(dv.shape[0]):
        np.add.at(out[r], di[r], dv[r])
    return out


def check_component_fd(comp, p0, step=1e-6, tol=1e-7):
    g, dv, di = comp.evaluate(p0)
    assert di.dtype == np.int32 and dv.shape == di.shape
    jac = dense(dv, di, comp.n_parameters)
    for j in range(comp.n_parameters):
        dp = np.zeros_like(p0)
        dp[j] = step
        fd = (comp.evaluate(p0 + dp)[0] - comp.evaluate(p0 - dp)[0]) / (2 * step)
        assert np.allclose(fd, jac[:, j], rtol=tol, atol=tol), (comp.name, j)
    return g


def test_scale_and_decay_components_fd():
    z = RNG.uniform(0, 100, 200)
    d = RNG.uniform(0.8, 5.0, 200)
    scale = ScaleSmooth1D(np.ones(9))
    scale.configure(z * 0.06993)
    check_component_fd(scale, RNG.normal(1.0, 0.2, 9))
    decay = DecaySmooth1D(np.zeros(7), restraint_weight=0.1)
    decay.configure(z * 0.04995, d)
    q = RNG.normal(0.0, 0.5, 7)
    g = check_component_fd(decay, q)
    # g = exp(B/(2d^2)) with B the smoothed value of the same weights
    b = np.log(g) * 2 * d**2
    w = dense(*decay.evaluate(q)[1:], 7)
    assert np.allclose(b, (w * (2 * d**2)[:, None] / g[:, None]) @ q, rtol=1e-12)
    assert decay.restraint_weights.tolist() == [0.1] * 7


def test_kb_components_fd_and_values():
    d = np.array([1.0, 2.0, 4.0])
    k = SingleScale([1.3])
    k.configure(3)
    assert check_component_fd(k, np.array([1.3])) == pytest.approx([1.3] * 3)
    b = SingleB([0.0])
    b.configure(d)
    g = check_component_fd(b, np.array([2.0]))
    assert g == pytest.approx(np.exp(2.0 / (2 * d**2)), rel=1e-15)


def test_grid_components_fd():
    n = 150
    grid2 = SmoothGrid2D(np.ones(12 * 5), (12, 5))
    grid2.configure(RNG.uniform(0, 10, n), RNG.uniform(0, 4, n))
    check_component_fd(grid2, RNG.normal(1, 0.1, 60))
    grid3 = SmoothGrid3D(np.ones(5 * 5 * 4), (5, 5, 4))
    grid3.configure(RNG.uniform(0, 3, n), RNG.uniform(0, 3, n), RNG.uniform(0, 2.5, n))
    check_component_fd(grid3, RNG.normal(1, 0.1, 100))


def test_real_harmonics_l1_closed_form():
    # with the CS phase cancelled, l = 1 is sqrt(3/4pi) (y, z, x)/r for m = -1, 0, 1
    v = RNG.normal(size=(20, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    table = real_harmonics(*theta_phi(v), lmax=1)
    c = math.sqrt(3 / (4 * math.pi))
    # DIALS multiplies m != 0 by a 10-digit sqrt(2): relative 2.6e-10
    assert np.allclose(table[:, 0], c * v[:, 1], rtol=1e-9, atol=1e-12)
    assert np.allclose(table[:, 1], c * v[:, 2], rtol=1e-15, atol=1e-15)
    assert np.allclose(table[:, 2], c * v[:, 0], rtol=1e-9, atol=1e-12)


def test_real_harmonics_l2_closed_form():
    v = RNG.normal(size=(20, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    x, y, z = v.T
    t = real_harmonics(*theta_phi(v), lmax=2)[:, 3:]
    c = 0.5 * math.sqrt(15 / math.pi)
    expected = [c * x * y, c * y * z, 0.25 * math.sqrt(5 / math.pi) * (3 * z**2 - 1), c * x * z,
                0.5 * c * (x**2 - y**2)]
    for col, e in enumerate(expected):
        assert np.allclose(t[:, col], e, rtol=1e-9, atol=1e-12), col


def test_absorption_component_average_and_fd():
    s0c = RNG.normal(size=(30, 3))
    s1c = RNG.normal(size=(30, 3))
    coeff = sph_harm_coefficients(s0c, s1c, 4)
    assert coeff.shape == (30, 24)
    assert np.allclose(
        coeff, 0.5 * (real_harmonics(*theta_phi(s0c), 4) + real_harmonics(*theta_phi(s1c), 4))
    )
    comp = SHAbsorption(np.zeros(24), surface_weight=5e5)
    comp.configure(coeff)
    c = RNG.normal(0, 0.01, 24)
    g = check_component_fd(comp, c)
    assert g == pytest.approx(1.0 + coeff @ c, rel=1e-14)
    assert comp.lmax == 4 and comp.restraint_weights.tolist() == [5e5] * 24


def test_lookup_table_is_the_cell_centre_value():
    v = RNG.normal(size=(50, 3))
    theta, phi = theta_phi(v)
    idx = lookup_index(theta, phi)
    cell_theta = np.floor(np.degrees(theta) * 2) / 2 + 0.25
    cell_phi = np.floor((np.degrees(phi) + 180) * 2) / 2 - 180 + 0.25
    centre = real_harmonics(np.radians(cell_theta), np.radians(cell_phi), 2)
    table = sph_harm_lookup_table(2)
    assert np.allclose(table[idx], centre, atol=1e-12)
    # and within a quarter-degree cell of the exact value
    exact = sph_harm_coefficients(v, v, 2)
    assert np.abs(sph_harm_coefficients_lookup(v, v, 2) - exact).max() < 0.02


@pytest.fixture(scope="module")
def quartz():
    t = read_reflections(data_path("quartz_processed", "integrated.refl"))
    e = read_experiments(data_path("quartz_processed", "integrated.expt"))[0]
    good = (t["flags"] & flags.integrated_sum) != 0
    return t.select(good & (t["d"] > 0)), e


def check_model_fd(model, rows=200, step=1e-6):
    p0 = model.parameter_vector()
    p0 = p0 + RNG.normal(0, 0.02, p0.size)
    model.set_parameter_vector(p0)
    sel = np.sort(RNG.choice(model.n_configured, size=rows, replace=False))
    g, dv, di = model.evaluate(rows=sel)
    jac = dense(dv, di, p0.size)
    g_prod = np.ones(rows)
    for comp in model.components.values():
        g_prod *= comp.evaluate(rows=sel)[0]
    assert np.allclose(g, g_prod, rtol=1e-14)
    fd = np.empty_like(jac)
    for j in range(p0.size):
        dp = np.zeros_like(p0)
        dp[j] = step
        model.set_parameter_vector(p0 + dp)
        up = model.evaluate(rows=sel)[0]
        model.set_parameter_vector(p0 - dp)
        down = model.evaluate(rows=sel)[0]
        fd[:, j] = (up - down) / (2 * step)
    model.set_parameter_vector(p0)
    assert np.allclose(fd, jac, rtol=1e-6, atol=1e-8)
    return g, dv, di


@pytest.mark.parametrize("kind", ["physical", "array", "KB"])
def test_full_model_derivatives(quartz, kind):
    table, expt = quartz
    params = default_model_params(model=kind)
    if kind == "array":
        params.array.modulation_correction = True
        params.array.n_modulation_bins = 4
    model = create_scaling_model(params, expt, table)
    model.configure(table, expt)
    expected = {"physical": ["scale", "decay", "absorption"],
                "array": ["decay", "absorption", "modulation"], "KB": ["scale", "decay"]}[kind]
    assert list(model.components) == expected
    check_model_fd(model)


def test_variance_of_g_matches_dense(quartz):
    table, expt = quartz
    model = create_scaling_model(default_model_params(), expt, table)
    model.configure(table, expt)
    g, dv, di = model.evaluate(rows=np.arange(40))
    n = model.n_parameters
    a = RNG.normal(size=(n, n))
    cov = a @ a.T * 1e-4
    jac = dense(dv, di, n)
    assert variance_of_g(dv, di, cov) == pytest.approx(np.einsum("ij,jk,ik->i", jac, cov, jac),
                                                       rel=1e-12)


def test_free_parameter_mask_and_restraints(quartz):
    table, expt = quartz
    params = default_model_params()
    params.physical.correction.fix = ["decay"]
    model = create_scaling_model(params, expt, table)
    sl = model.parameter_slices()
    mask = model.free_parameter_mask()
    assert not mask[sl["decay"]].any() and mask[sl["scale"]].all() and mask[sl["absorption"]].all()
    mask = model.free_parameter_mask(fix_initial=True)
    assert not mask[0] and mask[1:9].all()
    w = model.restraint_weights()
    assert (w[sl["scale"]] == 0).all() and (w[sl["decay"]] == 0.1).all()
    assert (w[sl["absorption"]] == 5e5).all()
    # the KB model never fixes its scale
    kb = create_scaling_model(default_model_params(model="KB"), expt, table)
    assert kb.free_parameter_mask(fix_initial=True).all()


def test_large_datasets_use_the_lookup_table(quartz, monkeypatch):
    import dials_vmerge.model.absorption_sh as sh
    from dials_vmerge.model.absorption_sh import crystal_frame_vectors

    table, expt = quartz
    model = create_scaling_model(default_model_params(), expt, table)
    model.configure(table, expt)
    exact = model.components["absorption"]._coefficients.copy()
    monkeypatch.setattr(sh, "LOOKUP_THRESHOLD", table.nrows - 1)
    model.configure(table, expt)
    approx = model.components["absorption"]._coefficients
    s0c, s1c = crystal_frame_vectors(expt, table["xyzobs.px.value"][:, 2], table["s1"])
    assert np.array_equal(approx, sph_harm_coefficients_lookup(s0c, s1c, 4))
    # half-degree cells: close to, but not equal to, the exact harmonics
    assert 0 < np.abs(approx - exact).max() < 0.02


def test_one_lookup_table_per_lmax_whatever_the_integer_type():
    from dials_vmerge.model.absorption_sh import sph_harm_lookup_table

    # the table (50 MB at lmax 4) is cached once, whether lmax is a numpy or a Python int
    assert sph_harm_lookup_table(np.int64(2)) is sph_harm_lookup_table(2)
    assert sph_harm_lookup_table(2).shape == (720 * 360, 8)
