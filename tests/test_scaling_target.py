"""The scaling target, gradient, normal matrix, Ih and determinism across nproc."""

import numpy as np
import pytest

from dials_vmerge.scaling import ih_table as iht
from dials_vmerge.scaling.parameters import ParameterManager
from dials_vmerge.scaling.target import ScalingTarget, variance_of_g

from test_scaling_toymodel import ToyKB, make_dataset, p1_space_group, unique_indices


def _problem(nproc=1, n_datasets=3, seed=3, restraint=(0.0, 0.0)):
    rng = np.random.default_rng(seed)
    hkl = unique_indices(rng, 60)
    true_j = rng.exponential(200.0, 60)
    models, tables = [], []
    for d in range(n_datasets):
        table, _ = make_dataset(rng, hkl, true_j, 1.0 + 0.2 * d, -3.0 + 2.0 * d, 150,
                                dataset_id=d)
        model = ToyKB(k=1.0 + 0.1 * d, b=0.5 * d, restraint=restraint)
        model.configure(table, None)
        models.append(model)
        tables.append(table)
    table = _ih_table_p1(tables)
    manager = ParameterManager(models)
    return ScalingTarget(manager, table, nproc=nproc), manager


def _ih_table_p1(tables):
    """IhTable of the toy datasets in P1: summation intensities, weights 1/variance, g = 1."""
    sg = p1_space_group()
    asu = [iht.map_indices_to_asu(t["miller_index"], sg, False) for t in tables]
    return iht.build_ih_table(asu, [t["intensity.sum.value"] for t in tables],
                              [t["intensity.sum.variance"] for t in tables],
                              [1.0 / t["intensity.sum.variance"] for t in tables],
                              [np.ones(t.nrows) for t in tables])


def _phi_and_residuals(target, x):
    """Independent numpy evaluation of the target and the residual vector r(x)."""
    target.manager.set_free(x)
    per = target.manager.evaluate()
    t = target.table
    g = np.array([per[d][0][i] for d, i in zip(t.dataset_id, t.loc_index)])
    grp = t.group_of_observation()
    s_wgi = np.bincount(grp, t.weight * g * t.intensity)
    s_wgg = np.bincount(grp, t.weight * g * g)
    ih = s_wgi / s_wgg
    r = t.intensity - g * ih[grp]
    return np.sum(t.weight * r * r) + np.sum(target.restraint_weights * x * x), r


def test_ih_table_hand_computed_group():
    # group (1,2,3): I = 10, 22 with w = 1, 0.5 and g = 1, 2:
    # Ih = (1*1*10 + 0.5*2*22) / (1*1 + 0.5*4) = 32 / 3
    asu = [np.array([[1, 2, 3], [0, 0, 5], [1, 2, 3]])]
    table = iht.build_ih_table(asu, [np.array([10.0, 7.0, 22.0])], [np.ones(3)],
                               [np.array([1.0, 1.0, 0.5])], [np.array([1.0, 3.0, 2.0])])
    assert table.group_start.tolist() == [0, 1, 3]
    assert table.asu_index.tolist() == [[0, 0, 5], [1, 2, 3]]
    assert table.loc_index.tolist() == [1, 0, 2]
    ih = table.merged_intensity()
    assert ih[0] == pytest.approx(7.0 / 3.0)
    assert ih[1] == pytest.approx(32.0 / 3.0, rel=1e-15)


def test_asu_mapping_merges_friedel_mates_unless_anomalous():
    from cctbx import sgtbx

    sg = sgtbx.space_group_info("P 43 21 2").group()
    hkl = np.array([[1, 2, 3], [-1, -2, -3], [2, 1, 3], [-2, 1, 3]])
    merged = iht.map_indices_to_asu(hkl, sg, anomalous=False)
    assert len({tuple(h) for h in merged}) == 1
    separate = iht.map_indices_to_asu(hkl, sg, anomalous=True)
    assert len({tuple(h) for h in separate}) == 2


def test_gradient_matches_finite_differences():
    target, manager = _problem(restraint=(0.0, 0.3))
    x = manager.get_free()
    phi, grad = target.value_and_gradient(x)
    phi_ref, _ = _phi_and_residuals(target, x)
    assert phi == pytest.approx(phi_ref, rel=1e-12)
    for j in range(x.size):
        step = 1e-6 * max(1.0, abs(x[j]))
        xp, xm = x.copy(), x.copy()
        xp[j] += step
        xm[j] -= step
        numeric = (_phi_and_residuals(target, xp)[0] - _phi_and_residuals(target, xm)[0]) / (
            2 * step)
        assert grad[j] == pytest.approx(numeric, rel=1e-5, abs=1e-6 * abs(phi))


def test_normal_matrix_matches_finite_difference_jacobian():
    target, manager = _problem(restraint=(0.0, 0.3))
    x = manager.get_free()
    phi, rhs, normal = target.normal_equations(x)
    _, r0 = _phi_and_residuals(target, x)
    jac = np.empty((r0.size, x.size))
    for j in range(x.size):
        step = 1e-6 * max(1.0, abs(x[j]))
        xp, xm = x.copy(), x.copy()
        xp[j] += step
        xm[j] -= step
        jac[:, j] = (_phi_and_residuals(target, xp)[1] - _phi_and_residuals(target, xm)[1]) / (
            2 * step)
    w = target.table.weight
    wr = target.restraint_weights
    expected_normal = jac.T @ (w[:, None] * jac) + np.diag(wr)
    expected_rhs = jac.T @ (w * r0) + wr * x
    scale = np.abs(expected_normal).max()
    assert np.allclose(normal, expected_normal, rtol=1e-5, atol=1e-7 * scale)
    assert np.allclose(rhs, expected_rhs, rtol=1e-5, atol=1e-7 * np.abs(expected_rhs).max())
    # gradient of the kernel pass equals 2 (J^T W r + wr p): the dIh/dp term sums to zero
    _, grad = target.value_and_gradient(x)
    assert np.allclose(grad, 2 * rhs, rtol=1e-9, atol=1e-9 * np.abs(grad).max())


def test_nproc_1_and_2_agree():
    t1, m1 = _problem(nproc=1)
    t2, m2 = _problem(nproc=2)
    x = m1.get_free()
    iht.set_num_threads(2)
    phi1, grad1 = t1.value_and_gradient(x)
    phi2, grad2 = t2.value_and_gradient(x)
    assert phi1 == pytest.approx(phi2, rel=1e-10)
    assert np.allclose(grad1, grad2, rtol=1e-10, atol=0)
    _, rhs1, n1 = t1.normal_equations(x)
    _, rhs2, n2 = t2.normal_equations(x)
    assert np.allclose(rhs1, rhs2, rtol=1e-10, atol=1e-10 * np.abs(rhs1).max())
    assert np.allclose(n1, n2, rtol=1e-10, atol=1e-10 * np.abs(n1).max())
    # the same nproc twice gives bit-identical results
    phi2b, grad2b = t2.value_and_gradient(x)
    assert phi2b == phi2 and np.array_equal(grad2b, grad2)


def test_variance_of_g_is_diag_j_cov_jt():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(7, 3))
    cols = np.array([[0, 2, -1]] * 4 + [[1, 3, 0]] * 3, dtype=np.int32)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T
    jac = np.zeros((7, 4))
    for i in range(7):
        for k in range(3):
            if cols[i, k] >= 0:
                jac[i, cols[i, k]] += values[i, k]
    assert np.allclose(variance_of_g(values, cols, cov), np.diag(jac @ cov @ jac.T),
                       rtol=1e-12)


class SharedDecayToy(ToyKB):
    """ToyKB whose B ("decay") is one parameter shared by all datasets."""

    def parameter_slices(self):
        return {"scale": slice(0, 1), "decay": slice(1, 2)}

    def shared_component(self):
        return "decay"


def test_shared_component_has_one_column_and_summed_restraints():
    rng = np.random.default_rng(8)
    hkl = unique_indices(rng, 40)
    true_j = rng.exponential(200.0, 40)
    models, tables = [], []
    for d in range(3):
        table, _ = make_dataset(rng, hkl, true_j, 1.0, -2.0, 120, dataset_id=d)
        model = SharedDecayToy(k=1.0 + 0.1 * d, b=0.3, restraint=(0.0, 0.5))
        model.configure(table, None)
        models.append(model)
        tables.append(table)
    manager = ParameterManager(models)
    assert manager.n_free == 4  # three scales, one shared B
    assert [c.tolist() for c in manager.free_columns] == [[0, 1], [2, 1], [3, 1]]
    assert manager.restraint_weights().tolist() == [0.0, 1.5, 0.0, 0.0]
    x = manager.get_free()
    x[1] = -1.0
    manager.set_free(x)
    assert all(m.p[1] == -1.0 for m in models)
    table = _ih_table_p1(tables)
    target = ScalingTarget(manager, table)
    _, grad = target.value_and_gradient(x)
    step = 1e-6
    xp, xm = x.copy(), x.copy()
    xp[1] += step
    xm[1] -= step
    numeric = (_phi_and_residuals(target, xp)[0] - _phi_and_residuals(target, xm)[0]) / (2 * step)
    assert grad[1] == pytest.approx(numeric, rel=1e-5)
