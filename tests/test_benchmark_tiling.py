"""The benchmark's kernel-only point tiles one configured pass: k copies must give exactly k
times the target and gradient (each copy forms its own unique reflections)."""

import os

import numpy as np

from conftest import DATA
from dials_vmerge.io import read_experiments, read_reflections
import benchmark_hooks


def test_tiled_pass_is_copies_times_the_pass():
    quartz = os.path.join(DATA, "quartz_processed")
    experiments = read_experiments(os.path.join(quartz, "integrated.expt"))
    table = read_reflections(os.path.join(quartz, "integrated.refl"))
    base = benchmark_hooks.make_target_evaluator(experiments, table, 1)
    phi, grad = base()
    tiled = benchmark_hooks.tile_evaluator(base, 3, nproc=1)
    assert tiled.n_obs == 3 * base.n_obs and tiled.n_groups == 3 * base.n_groups
    phi3, grad3 = tiled()
    np.testing.assert_allclose(phi3, 3 * phi, rtol=1e-12)
    np.testing.assert_allclose(grad3, 3 * grad, rtol=1e-10, atol=1e-12 * np.abs(grad).max())
    assert benchmark_hooks.bytes_read_per_pass(tiled) == 3 * base.n_obs * base.inputs.bytes_per_observation() + (
        3 * base.n_groups + 1
    ) * 8
    tiled.set_nproc(2)
    phi3b, grad3b = tiled()
    np.testing.assert_allclose(phi3b, phi3, rtol=1e-10)
