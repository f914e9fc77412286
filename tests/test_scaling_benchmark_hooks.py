"""The benchmark entry point: one target+gradient pass over every observation."""

import os

import numpy as np
import pytest

from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.scaling.benchmark_hooks import bytes_read_per_pass, make_target_evaluator
from dials_vmerge.scaling.ih_table import map_indices_to_asu
from dials_vmerge import geometry

from conftest import DATA

QUARTZ = os.path.join(DATA, "quartz_processed")


def test_evaluator_matches_numpy_on_quartz_and_across_nproc():
    experiments = read_experiments(os.path.join(QUARTZ, "integrated.expt"))
    table = read_reflections(os.path.join(QUARTZ, "integrated.refl"))
    # two pseudo-datasets (first and second half of the sweep) so that the gradient at
    # g = 1 is not identically zero (for one dataset sum_l w r = 0 in every group)
    second_half = table["xyzobs.px.value"][:, 2] > 50
    table["id"] = second_half.astype(np.int32)
    experiments = [experiments[0], experiments[0]]
    ev1 = make_target_evaluator(experiments, table, nproc=1)
    phi1, grad1 = ev1()
    ok = table["intensity.sum.variance"] > 0
    assert ev1.n_obs == ok.sum()
    assert grad1.shape == (4,)
    # independent numpy evaluation at g = 1: phi = sum w (I - Ih)^2,
    # dphi/dK = sum -2 w r Ih, dphi/dB = sum -2 w r Ih / (2 d^2)
    i = table["intensity.sum.value"][ok]
    w = 1.0 / table["intensity.sum.variance"][ok]
    asu = map_indices_to_asu(table["miller_index"][ok], geometry.space_group(experiments[0]),
                             False)
    _, group = np.unique(asu, axis=0, return_inverse=True)
    group = group.ravel()
    ih = np.bincount(group, w * i) / np.bincount(group, w)
    r = i - ih[group]
    assert phi1 == pytest.approx(np.sum(w * r * r), rel=1e-11)
    half_s = 0.5 / table["d"][ok] ** 2
    dataset = second_half[ok]
    for d in (0, 1):
        in_d = dataset == d
        terms_k = -2 * w * r * ih[group] * in_d
        terms_b = terms_k * half_s
        assert abs(grad1[2 * d] - terms_k.sum()) < 1e-10 * np.abs(terms_k).sum()
        assert abs(grad1[2 * d + 1] - terms_b.sum()) < 1e-10 * np.abs(terms_b).sum()
        assert abs(terms_k.sum()) > 1e-3 * np.abs(terms_k).sum()  # a gradient worth testing
    ev2 = make_target_evaluator(experiments, table, nproc=2)
    phi2, grad2 = ev2()
    assert phi2 == pytest.approx(phi1, rel=1e-10)
    assert np.allclose(grad2, grad1, rtol=1e-10, atol=1e-10 * np.abs(grad1).max())
    # 3 doubles + 2 x (double + int32) per observation, one int64 offset per group (+1)
    assert bytes_read_per_pass(ev1) == ev1.n_obs * 48 + (ev1.n_groups + 1) * 8
    assert bytes_read_per_pass(1000, 100) == 48000 + 808
