"""The kernel layer (dials_vmerge/kernels): flat layout helpers and the KB family kernel,
checked against plain numpy written here, one dataset at a time."""

import os
import subprocess
import sys

import numpy as np

import dials_vmerge  # noqa: F401
from dials_vmerge.kernels.flat import gather_by_dataset, rows_by_dataset, scatter_mask
from dials_vmerge.kernels.kb_family import evaluate_kb_family, evaluate_kb_family_g


def test_rows_by_dataset_lists_each_datasets_rows_in_order():
    rng = np.random.default_rng(0)
    dataset = rng.integers(0, 7, size=1000)
    dataset[dataset == 3] = 4  # a dataset without rows
    order, offsets = rows_by_dataset(dataset, 7)
    for d in range(7):
        np.testing.assert_array_equal(order[offsets[d]:offsets[d + 1]], np.flatnonzero(dataset == d))


def test_gather_and_scatter_by_dataset():
    rng = np.random.default_rng(1)
    sizes = [5, 0, 9, 3]
    per_dataset = [rng.normal(size=n) for n in sizes]
    dataset = np.array([2, 0, 3, 2, 0, 2])
    local = np.array([8, 4, 0, 1, 0, 1])
    expected = np.array([per_dataset[d][r] for d, r in zip(dataset, local)])
    np.testing.assert_array_equal(gather_by_dataset(per_dataset, dataset, local), expected)
    mask = np.array([True, True, False, True, False, False])
    masks = scatter_mask(dataset, local, mask, sizes)
    for d, n in enumerate(sizes):
        want = np.zeros(n, dtype=bool)
        want[local[(dataset == d) & mask]] = True
        np.testing.assert_array_equal(masks[d], want)


def test_kb_family_kernel_equals_numpy_per_dataset():
    rng = np.random.default_rng(2)
    n_datasets, n_rows = 40, 5000
    row_dataset = rng.integers(0, n_datasets, size=n_rows)
    d_spacing = rng.uniform(1.2, 20.0, size=n_rows)
    inv_two_d_sq = 1.0 / (2.0 * d_spacing ** 2)
    fixed = rng.uniform(0.8, 1.2, size=n_rows)
    scale = rng.uniform(0.5, 2.0, size=n_datasets)
    decay = rng.normal(0.0, 3.0, size=n_datasets)
    scale_col = np.arange(n_datasets, dtype=np.int32) * 2
    decay_col = scale_col + 1
    scale_col[5] = -1  # a fixed scale
    decay_col[7] = -1  # no decay term
    decay[7] = 0.0
    for fixed_factor in (None, fixed):
        g, values, cols = evaluate_kb_family(row_dataset, inv_two_d_sq, fixed_factor, scale,
                                             decay, scale_col, decay_col)
        for d in range(n_datasets):
            rows = np.flatnonzero(row_dataset == d)
            f = np.ones(rows.size) if fixed_factor is None else fixed_factor[rows]
            s = 1.0 / (2.0 * d_spacing[rows] ** 2)
            g_d = scale[d] * np.exp(decay[d] * s) * f
            np.testing.assert_allclose(g[rows], g_d, rtol=1e-14)
            np.testing.assert_allclose(values[rows, 0], np.exp(decay[d] * s) * f, rtol=1e-14)
            np.testing.assert_allclose(values[rows, 1], g_d * s, rtol=1e-14)
            assert np.all(cols[rows, 0] == scale_col[d]) and np.all(cols[rows, 1] == decay_col[d])
        np.testing.assert_allclose(
            evaluate_kb_family_g(row_dataset, inv_two_d_sq, fixed_factor, scale, decay), g,
            rtol=1e-15)


def test_kb_family_equals_the_models_own_evaluation():
    """KBFamily (scaling/family.py) over real KB models against each model's evaluate()."""
    from dials_vmerge.model.kb_model import KBScalingModel
    from dials_vmerge.scaling.family import KBFamily
    from dials_vmerge.scaling.parameters import ParameterManager

    rng = np.random.default_rng(3)
    models, sizes = [], [30, 1, 55, 12]
    for n in sizes:
        model = KBScalingModel({"scale": (np.array([rng.uniform(0.5, 2)]), None),
                                "decay": (np.array([rng.normal()]), None)},
                               {"corrections": ["decay", "scale"]})
        model.configure({"d": rng.uniform(1.5, 10.0, size=n)})
        models.append(model)
    models[2].fixed_components = ["decay"]  # KB.correction.fix=decay on one dataset
    manager = ParameterManager(models)
    x = manager.get_free() * 1.1
    manager.set_free(x)
    dataset = np.concatenate([np.full(n, d) for d, n in enumerate(sizes)])
    local = np.concatenate([np.arange(n) for n in sizes])
    permutation = rng.permutation(dataset.size)
    family = KBFamily(models, manager.column_of_parameter, dataset[permutation], local[permutation])
    g, values, cols = family.evaluate(x)
    for d, (g_d, v_d, c_d) in enumerate(manager.evaluate()):
        rows = np.flatnonzero(dataset[permutation] == d)
        src = local[permutation][rows]
        np.testing.assert_allclose(g[rows], g_d[src], rtol=1e-14)
        for slot in range(2):  # compare the derivative of each free column
            for k in range(c_d.shape[1]):
                same = cols[rows, slot] == c_d[src, k]
                np.testing.assert_allclose(values[rows, slot][same & (c_d[src, k] >= 0)],
                                           v_d[src, k][same & (c_d[src, k] >= 0)], rtol=1e-14)
    assert np.all(cols[dataset[permutation] == 2, 1] == -1)  # its B is not refined
    assert np.all(cols[dataset[permutation] != 2, 1] >= 0)


def test_kernel_layer_imports_without_cctbx():
    """The kernel package needs numpy and numba alone: import it with cctbx made unavailable."""
    code = ("import sys; sys.modules['cctbx'] = None; sys.modules['scitbx'] = None\n"
            "import dials_vmerge.kernels.flat, dials_vmerge.kernels.kb_family\n"
            "assert 'cctbx.sgtbx' not in sys.modules\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
