"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_passes.py: the device passes of one scaling
round against their CPU kernels on small real layouts. Each case runs the real pipeline with
compute.device=cuda up to its first device target (so the layout is the one a run builds:
selection, preparation, models, Ih table), evaluates every pass once on the device and on
the CPU at the same perturbed parameters, and stops the job. Writes the max relative
differences and the dense matrices the test recomputes to an .npz (argv[1]); the test makes
every assertion.

Cases (argv[2:], default all): kb (a 200-still KB simulation), array (an array-model sweep
simulation), quartz (the physical model on examples/integrated.refl, the quartz sweep).
"""

import copy
import logging
import os
import sys
import time

import dials_vmerge  # noqa: F401  (cctbx before numba)
import numpy as np
from numba import cuda

from dials_vmerge.backends import run_device
from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.scaling.target import ScalingTarget, variance_of_g

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")
LOG = logging.getLogger("cuda_pass_checks")
assert cuda.is_available(), "run with NUMBA_ENABLE_CUDASIM=1"


class FirstTarget(Exception):
    pass


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def dense(deriv, cols, n_par):
    out = np.zeros((deriv.shape[0], n_par))
    rows = np.repeat(np.arange(deriv.shape[0]), deriv.shape[1])
    c = np.asarray(cols).reshape(-1)
    keep = c >= 0
    np.add.at(out, (rows[keep], c[keep]), deriv.reshape(-1)[keep])
    return out


def compare(target, seed, with_normal=True, n_segments=None):
    """Every pass of one device target at perturbed parameters vs the CPU target."""
    manager = target.manager
    cpu = ScalingTarget(manager, target.table, 2)
    rng = np.random.default_rng(seed)
    x0 = manager.get_free()
    x = x0 + 0.02 * np.where(x0 != 0, np.abs(x0), 1.0) * rng.normal(size=x0.size)
    out = {"kind": target.kind, "n_obs": target.n_obs, "n_par": target.n_par}
    phi_d, grad_d = target.value_and_gradient(x)
    n = target.n_obs
    g_d = target._g.copy_to_host()[:n]
    deriv_d = target._deriv.copy_to_host()[:n]
    cols_d = target.normal_free_columns()
    phi_c, grad_c = cpu.value_and_gradient(x)
    g_c, deriv_c, cols_c = cpu._ell(x)
    out["model_g"] = rel(g_d, g_c)
    out["model_deriv"] = rel(dense(deriv_d, cols_d, target.n_par),
                             dense(deriv_c, cols_c, target.n_par))
    out["target_phi"] = rel(phi_d, phi_c)
    out["target_gradient"] = rel(grad_d, grad_c)
    if with_normal:
        out.update(compare_normal(target, cpu, x, n_segments))
    # var(g) with a random symmetric positive definite covariance of the free parameters
    m = rng.normal(size=(target.n_par, target.n_par))
    cov = m @ m.T / target.n_par
    cols64 = np.ascontiguousarray(cols_d, dtype=np.int64)
    var_d = cuda.device_array(max(n, 1))
    device_models.variance_of_g_kernel[device_models.blocks(n), device_models.THREADS_PER_BLOCK](
        target._deriv[:n], cuda.to_device(cols64), cuda.to_device(cov), var_d)
    out["var_g"] = rel(var_d.copy_to_host()[:n],
                       variance_of_g(deriv_c, np.ascontiguousarray(cols_c, np.int64), cov))
    out.update(compare_streamed_batches(target.table, g_c, deriv_c, cols_c, target.n_par,
                                        phi_c - float(np.sum(target.restraint_weights * x * x)),
                                        grad_c - 2.0 * target.restraint_weights * x))
    out.update(compare_outliers(target.table, g_c, rng))
    out.update(compare_merging(target.table, g_c, rng))
    out.update(compare_robust_variational(target.table, g_c))
    out.update(compare_error_model(target.table, g_c))
    out.update(compare_expand(manager, rng))
    return out


def compare_streamed_batches(table, g, deriv, cols, n_par, phi_cpu, grad_cpu):
    """The target over a tiny forced batch size (batches of whole groups on two streams,
    g and dg/dp uploaded batch by batch from the host) vs one batch, and both vs the CPU
    data term."""
    from dials_vmerge.kernels.cuda.target import DeviceTarget

    gs = np.asarray(table.group_start, dtype=np.int64)
    n = int(gs[-1])
    one = DeviceTarget(table.intensity, table.weight, gs, cols, n_par)
    many = DeviceTarget(table.intensity, table.weight, gs, cols, n_par,
                        batch_size=max(20, n // 9))
    g = np.ascontiguousarray(g, np.float64)
    deriv = np.ascontiguousarray(deriv, np.float64)
    phi_1, grad_1 = one.evaluate(cuda.to_device(g), cuda.to_device(deriv))
    phi_m, grad_m = many.evaluate(cuda.device_array(n), cuda.device_array(deriv.shape), g,
                                  deriv)
    return {"streamed_batches": len(many.batches), "streamed_streams": len(many._streams()),
            "streamed_vs_one": max(rel(phi_m, phi_1), rel(grad_m, grad_1)),
            "streamed_vs_cpu": max(rel(phi_m, phi_cpu), rel(grad_m, grad_cpu))}


def compare_robust_variational(table, g):
    """Robust (Student-t) and variational merging (Gaussian and Student-t likelihoods,
    Sigma(d) by EM) of the scaled intensities, CPU kernels vs the device, through the
    merging functions a run calls (the device chosen by run_device's pass device)."""
    from dials_vmerge.merging.robust import merge_robust
    from dials_vmerge.merging.variational import merge_variational

    groups = grouped_observations(table)
    intensity = np.asarray(table.intensity, np.float64) / g
    sigma = 1.0 / np.sqrt(np.asarray(table.weight, np.float64)) / g
    out = {}
    runs = {"robust": lambda: merge_robust(groups, intensity, sigma),
            "variational": lambda: merge_variational(groups, intensity, sigma, n_bins=4,
                                                     max_em_iterations=3),
            "variational_t": lambda: merge_variational(groups, intensity, sigma, dof=4.0,
                                                       n_bins=4, max_em_iterations=2)}
    for name, merge in runs.items():
        run_device._PASS_DEVICE[0] = "cpu"
        cpu = merge()
        run_device._PASS_DEVICE[0] = "cuda"
        dev = merge()
        diffs = [rel(dev.intensity, cpu.intensity), rel(dev.sigma, cpu.sigma)]
        if name.startswith("variational"):
            diffs += [rel(dev.amplitude, cpu.amplitude),
                      rel(dev.amplitude_sigma, cpu.amplitude_sigma)]
            out[f"{name}_em_iterations"] = int(cpu.extra["em_iterations"])
            out[f"{name}_centric"] = int(np.count_nonzero(groups.centric))
        else:
            out["robust_fallback_differ"] = int(np.count_nonzero(
                cpu.extra["sigma_fallback"] != dev.extra["sigma_fallback"]))
            out["robust_reweighted"] = int(np.count_nonzero(np.diff(groups.group_start) >= 3))
        out[f"merge_{name}"] = max(diffs)
        out[f"merge_{name}_n"] = len(cpu.intensity)
    return out


def grouped_observations(table):
    """GroupedObservations of the Ih table's groups (observations in table order), with
    every fifth group centric so both prior families are exercised."""
    from dials_vmerge.merging.groups import GroupedObservations

    gs = np.asarray(table.group_start, dtype=np.int64)
    n_groups = gs.size - 1
    rng = np.random.default_rng(11)
    return GroupedObservations(
        permutation=np.arange(gs[-1], dtype=np.int64), group_start=gs,
        asu_index=np.zeros((n_groups, 3), np.int32), centric=np.arange(n_groups) % 5 == 0,
        epsilon=np.ones(n_groups), dstar_sq=np.sort(rng.uniform(0.01, 0.5, n_groups)),
        anomalous=False)


def compare_error_model(table, g):
    """The error-model sums: the ML profile likelihood of b (a^2 and cost at several b, a
    free and fixed), the DIALS b functional's binned sums, and the refined (a, b) of both
    refinements with every evaluation on the device vs the CPU."""
    from dials_vmerge.kernels.cuda.error_model import DeviceErrorModelSums
    from dials_vmerge.kernels.error_model_ml import a_sq_and_cost_kernel, cost_slope_kernel
    from dials_vmerge.backends.cuda_job_table import new_job_table
    from dials_vmerge.scaling import error_model as em

    gs = np.asarray(table.group_start, dtype=np.int64)
    group = np.repeat(np.arange(gs.size - 1), np.diff(gs))
    # as the refinement's filter: groups of two or more (a single observation has r = 0 and
    # unit variance 0, clamped to 1e-300, which makes the likelihood meaningless)
    keep = (np.diff(gs) > 1)[group]
    sizes = np.diff(gs)[np.diff(gs) > 1]
    gs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    group = np.repeat(np.arange(sizes.size), sizes)
    intensity = np.asarray(table.intensity, np.float64)[keep]
    weight = np.asarray(table.weight, np.float64)[keep]
    g = np.asarray(g, np.float64)[keep]
    variance = 1.0 / weight
    u = weight * g * g
    total = np.bincount(group, u, minlength=gs.size - 1)
    share = u / total[group]
    ih = (np.bincount(group, weight * g * intensity, minlength=gs.size - 1) / total)[group]
    residual_sq = (intensity / g - ih) ** 2
    device = DeviceErrorModelSums(intensity, variance, g, share, residual_sq, group)
    worst = 0.0
    for b in (0.0, 0.02, 0.1):
        for fixed_a_sq in (-1.0, 1.44):
            cpu = a_sq_and_cost_kernel(intensity, variance, g, share, group, residual_sq,
                                       gs.size - 1, b, fixed_a_sq, np.empty(intensity.size))
            dev = device.a_sq_and_cost(b, fixed_a_sq)
            worst = max(worst, rel(dev[0], cpu[0]), rel(dev[1], cpu[1]))
    out = {"error_model_ml_sums": worst, "error_model_rows": intensity.size}
    worst = 0.0
    for b in (0.01, 0.05):
        for fixed_a_sq in (-1.0, 1.44):
            n = intensity.size
            cpu = cost_slope_kernel(intensity, variance, g, share, group, residual_sq,
                                    gs.size - 1, b, fixed_a_sq, np.empty(n), np.empty(n))
            worst = max(worst, rel(device.cost_slope(b, fixed_a_sq), cpu))
    out["error_model_ml_slope"] = worst
    expected = ih * g
    bin_index, n_bins = em.intensity_bins(expected, 10)
    prefactor = np.sqrt(np.diff(gs)[group] / np.maximum(np.diff(gs)[group] - 1.0, 1.0))
    device = DeviceErrorModelSums(intensity, variance, g, ih=ih, prefactor=prefactor,
                                  bin_index=bin_index, n_bins=n_bins)
    worst = 0.0
    for a, b in ((1.0, 0.02), (1.3, 0.05)):
        s1c, s2c = em._binned_deviation_sums(intensity, variance, g, ih, prefactor, bin_index,
                                             n_bins, a, b)
        s1d, s2d = device.binned_deviation_sums(a, b)
        worst = max(worst, rel(s1d, s1c), rel(s2d, s2c))
    out["error_model_binned_sums"] = worst
    out["error_model_bins"] = n_bins
    data = em.ErrorModelData(intensity, variance, g, ih, np.diff(gs)[group].astype(float),
                             expected, bin_index, n_bins, prefactor, share, group)
    for name, refine in (("ml", lambda: em.refine_maximum_likelihood(data)),
                         ("individual", lambda: em.refine_individual(data)[:2])):
        run_device._PASS_DEVICE[0] = "cpu"
        data._device_binned_sums = None
        cpu = refine()
        run_device._PASS_DEVICE[0] = "cuda"
        store = new_job_table()
        dev = refine()
        # a second refinement of the same data (a new device object, as a run's next
        # refinement makes): the job table finds every array resident, nothing goes up
        first = store.summary()["error model"]["calls"]
        data._device_binned_sums = None
        again = refine()
        calls = store.summary()["error model"]["calls"]
        out[f"error_model_{name}_first_upload_bytes"] = sum(
            c["observation_bytes"] for c in first)
        out[f"error_model_{name}_second_upload_bytes"] = sum(
            c["observation_bytes"] for c in calls[len(first):])
        out[f"error_model_{name}_second_calls"] = len(calls) - len(first)
        out[f"error_model_{name}_repeat"] = max(rel(again[0], dev[0]), rel(again[1], dev[1]))
        # b below error_model.B_ZERO (1e-8) is b = 0 found to Brent's accuracy: which tiny
        # b a search ends on is rounding noise, and it changes sigma'^2 = a^2 (sigma^2 +
        # b^2 I^2) by < 1e-16 I^2, so b is compared to 1e-10 relative plus 1e-8 absolute
        b_diff = abs(dev[1] - cpu[1]) / (1e-10 * abs(cpu[1]) + 1e-8) * 1e-10
        out[f"error_model_{name}_ab"] = max(rel(dev[0], cpu[0]), b_diff)
        out[f"error_model_{name}_b"] = float(cpu[1])
        out[f"error_model_{name}_used_device"] = int(
            name == "ml" or getattr(data, "_device_binned_sums", None) is not None)
    return out


def compare_expand(manager, rng):
    """g and var(g) of every configured row of every dataset: ScalingRun.expand's CPU loop
    (each model's own evaluate_g, evaluate_dataset + variance_of_g) vs backends.cuda_expand, with a
    random SPD covariance and a chunk size that splits datasets."""
    from types import SimpleNamespace

    from dials_vmerge.backends.cuda_expand import expand_on_device

    def _evaluate_g(model):  # each model's own evaluation, dataset by dataset
        if hasattr(model, "evaluate_g"):
            return model.evaluate_g()
        return np.asarray(model.evaluate()[0], dtype=np.float64)

    g_cpu = [_evaluate_g(m) for m in manager.models]
    m = rng.normal(size=(manager.n_free, manager.n_free))
    cov = m @ m.T / manager.n_free
    var_cpu = []
    for d, g in enumerate(g_cpu):
        _, values, cols = manager.evaluate_dataset(d, np.arange(g.size))
        var_cpu.append(variance_of_g(values, np.ascontiguousarray(cols, np.int64), cov))
    states = [SimpleNamespace(suitable_rows=np.arange(g.size), g=None, var_g=None)
              for g in g_cpu]
    total = sum(g.size for g in g_cpu)
    done = expand_on_device(states, manager, cov, chunk_rows=max(7, total // 3 + 1))
    out = {"expand_on_device": int(done)}
    if done:
        out["expand_g"] = max(rel(s.g, g) for s, g in zip(states, g_cpu))
        out["expand_var_g"] = max(rel(s.var_g, v) for s, v in zip(states, var_cpu))
        out["expand_rows"] = total
    return out


def compare_merging(table, g, rng):
    """Classical merge (internal variance off and on) and the Rmerge sums of the scaled
    intensities I/g, sigma/g, with a few sigma = 0 observations (not used by the merge)."""
    from dials_vmerge.kernels.cuda import merging as device_merging
    from dials_vmerge.merging.classical import (SIGMA_DYNAMIC_RANGE, deviation_sums_kernel,
                                                inverse_variance_merge_kernel)

    intensity = np.asarray(table.intensity, np.float64) / g
    sigma = 1.0 / np.sqrt(np.asarray(table.weight, np.float64)) / g
    sigma[rng.choice(sigma.size, size=max(2, sigma.size // 100), replace=False)] = 0.0
    gs = np.asarray(table.group_start, dtype=np.int64)
    out = {}
    for internal in (False, True):
        mean_c, sig_c = inverse_variance_merge_kernel(intensity, sigma, gs, SIGMA_DYNAMIC_RANGE,
                                                      internal)
        mean_d, sig_d = device_merging.inverse_variance_merge(intensity, sigma, gs,
                                                              SIGMA_DYNAMIC_RANGE, internal)
        tag = "internal" if internal else "external"
        out[f"merge_{tag}"] = max(rel(mean_d, mean_c), rel(sig_d, sig_c))
    dev_c, tot_c = deviation_sums_kernel(intensity, gs, mean_c)
    dev_d, tot_d = device_merging.deviation_sums(intensity, gs, mean_c)
    out["statistics_sums"] = max(rel(dev_d, dev_c), rel(tot_d, tot_c))
    return out


def compare_outliers(table, g, rng):
    """Outlier masks (standard and simple) of the device and CPU kernels, with a few
    intensities made outliers so that both tests reject something."""
    from types import SimpleNamespace

    from dials_vmerge.kernels.cuda.outliers import outlier_mask
    from dials_vmerge.scaling.outliers import simple_outliers, standard_outliers

    intensity = np.array(table.intensity, dtype=np.float64)
    hit = rng.choice(intensity.size, size=max(3, intensity.size // 50), replace=False)
    intensity[hit] = intensity[hit] * 30.0 + 50.0 * np.sqrt(1.0 / np.asarray(table.weight)[hit])
    t = SimpleNamespace(intensity=intensity, weight=np.asarray(table.weight, np.float64),
                        g=g, group_start=np.asarray(table.group_start), n_obs=intensity.size)
    out = {}
    for method, cpu_kernel in (("standard", standard_outliers), ("simple", simple_outliers)):
        cpu = cpu_kernel(t, 6.0, 2)
        dev = outlier_mask(t.intensity, t.weight, t.g, t.group_start, method, 6.0)
        out[f"outliers_{method}_n"] = int(cpu.sum())
        out[f"outliers_{method}_differ"] = int(np.count_nonzero(cpu != dev))
    return out


def compare_normal(target, cpu, x, n_segments):
    from dials_vmerge.kernels.cuda.normal import DeviceNormalEquations

    out = {}
    if n_segments is not None and getattr(target, "_key_bounds", None) is not None:
        # issue 11: a program's job sums one device segment per key block (added as
        # block_sums' tree); checked against the CPU here, then the forced segments below
        # (the non-key path, as outside a program's job) for the ordered reduction
        phi_k, rhs_k, normal_k = target.normal_equations(x)
        phi_c, rhs_c, normal_c = cpu.normal_equations(x)
        out["normal_key_blocks"] = max(rel(phi_k, phi_c), rel(rhs_k, rhs_c),
                                       rel(normal_k, normal_c))
        out["normal_key_block_segments"] = target._normal.n_segments
        target._key_bounds = None
    if n_segments is not None:  # several segments on a small layout: the ordered reduction
        gs = np.ascontiguousarray(target.table.group_start, dtype=np.int64)
        dt = target._device_target
        target._normal = DeviceNormalEquations(dt.intensity, dt.weight, gs, cuda.to_device(gs),
                                               target.normal_free_columns(), target.n_par,
                                               n_segments)
    t0 = time.perf_counter()
    phi_nd, rhs_d, normal_d = target.normal_equations(x)
    out["normal_seconds"] = time.perf_counter() - t0
    phi_nc, rhs_c, normal_c = cpu.normal_equations(x)
    out["normal_phi"] = rel(phi_nd, phi_nc)
    out["normal_rhs"] = rel(rhs_d, rhs_c)
    out["normal_matrix"] = rel(normal_d, normal_c)
    out["normal_segments"] = target._normal.n_segments
    # for the test's independent recomputation of J^T W J (small layouts only)
    n = target.n_obs
    if n * target.n_par <= 4_000_000:
        g_c, deriv_c, cols_c = cpu._ell(x)
        t = target.table
        out["J_dense"] = dense(deriv_c, cols_c, target.n_par)
        out["g"] = g_c
        out["intensity"] = np.asarray(t.intensity)
        out["weight"] = np.asarray(t.weight)
        out["group_start"] = np.asarray(t.group_start)
        out["normal_device"] = normal_d
        out["rhs_device"] = rhs_d
        out["restraint_weights"] = target.restraint_weights
        out["x"] = x
    return out


def first_target_of(params_args, experiments, table):
    from dials_vmerge.pipeline import run_scaling_job
    from cuda_simulator_runs import scaling_params

    captured = {}
    original = run_device.make_scaling_target

    def hook(device, manager, ih_table, nproc=1, batch_size=None, **kwargs):
        target = original(device, manager, ih_table, nproc, batch_size, **kwargs)
        if device == "cuda":
            captured["target"] = target
            raise FirstTarget
        return target

    run_device.make_scaling_target = hook
    try:
        run_scaling_job(scaling_params(*params_args), experiments, table, LOG)
    except FirstTarget:
        pass
    finally:
        run_device.make_scaling_target = original
    return captured["target"]


def case_inputs(name):
    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.simulate import simulate_rotation, simulate_stills

    if name == "quartz":
        from dials_vmerge.io.combine import load_experiments_and_reflections

        experiments, table = load_experiments_and_reflections(
            [os.path.join(EXAMPLES, "integrated.expt")],
            [os.path.join(EXAMPLES, "integrated.refl")])
        return experiments, table, ("model=physical",)
    if name == "kb":
        simulation = simulate_stills(n_stills=200, d_min=8.0, seed=5)
        model = ("model=KB",)
    elif name == "kb_normal":
        simulation = simulate_stills(n_stills=20, d_min=8.0, seed=6)
        model = ("model=KB",)
    else:
        # coarse grids keep n_par (and the simulator's n_par^2 reduction threads) small
        simulation = simulate_rotation(n_obs_target=1500, n_sweeps=2, model="array", seed=7)
        model = ("model=array", "array.n_resolution_bins=3", "array.n_absorption_bins=1",
                 "array.decay_interval=60")
    experiments_dict, table, _ = simulation
    return ExperimentList.from_dict(copy.deepcopy(experiments_dict)), table.copy(), model


# The 200-still KB layout has 400 parameters: its normal matrix is checked on 20 stills
# (kb_normal), whose 40 x 40 reduction the simulator runs in seconds. Forced segment counts
# exercise the ordered reduction over several segments on layouts this small.
CASE_OPTIONS = {"kb": {"with_normal": False}, "kb_normal": {"n_segments": 3},
                "array": {"n_segments": 3}}


def main(out_path, names):
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    out = {}
    for seed, name in enumerate(names):
        t0 = time.perf_counter()
        experiments, table, model = case_inputs(name)
        target = first_target_of(model + ("compute.device=cuda",), experiments, table)
        result = compare(target, seed, **CASE_OPTIONS.get(name, {}))
        for key, value in result.items():
            out[f"{name}/{key}"] = value
        print(f"{name}: {target.kind}, {target.n_obs} obs, {target.n_par} params, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    np.savez(out_path, **out)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main(sys.argv[1], sys.argv[2:] or ["kb", "kb_normal", "array", "quartz"])
