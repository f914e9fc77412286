"""The device passes of a scaling round against their CPU kernels, under the CUDA simulator
(issue 12, test 1), on the layouts a real run builds: a 200-still KB simulation, an array
model sweep simulation and the quartz sweep (physical model). The runs happen in a subprocess
(tests/cuda_pass_checks.py: the simulator must be on before numba.cuda is imported); every
assertion is made here. The normal matrix is also recomputed here with dense numpy, an
implementation independent of both kernels. Also compared: g and var(g) of every configured
row (ScalingRun.expand), the error-model sums and both refinements' (a, b), robust and
variational merging through the functions a run calls, and the target over a tiny forced
batch size (two CUDA streams) against one batch.
"""

import os
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
# The bar. Device and CPU add in different orders (segments vs chunks, per-block
# trees): the differences seen are ~1e-15.
RTOL = 1e-10
KINDS = {"kb": "kb", "kb_normal": "kb", "array": "array", "quartz": "physical"}


def pass_checks(tmp_path, case):
    out = tmp_path / f"{case}.npz"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_pass_checks.py"), str(out),
                          case], env=SIM, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    data = np.load(out)
    return {key.split("/", 1)[1]: data[key] for key in data.files}


def dense_normal_equations(d):
    """J^T W J and J^T W r (+ restraints) from dense dg/dp, group by group, in numpy."""
    J_g, g, I, w, gs = d["J_dense"], d["g"], d["intensity"], d["weight"], d["group_start"]
    n_par = J_g.shape[1]
    normal = np.zeros((n_par, n_par))
    rhs = np.zeros(n_par)
    for lo, hi in zip(gs[:-1], gs[1:]):
        gg, ii, ww, dg = g[lo:hi], I[lo:hi], w[lo:hi], J_g[lo:hi]
        s_wgg = np.sum(ww * gg * gg)
        if s_wgg <= 0:
            continue
        ih = np.sum(ww * gg * ii) / s_wgg
        d_ih = (ww * (ii - 2.0 * gg * ih)) @ dg / s_wgg
        jac = -(ih * dg + gg[:, None] * d_ih[None, :])  # dr/dp, r = I - g Ih
        r = ii - gg * ih
        normal += jac.T @ (ww[:, None] * jac)
        rhs += jac.T @ (ww * r)
    wr = d["restraint_weights"]
    return normal + np.diag(wr), rhs + wr * d["x"]


@pytest.mark.parametrize("case", ["kb", "kb_normal", "array", "quartz"])
def test_device_passes_equal_cpu_kernels(tmp_path, case):
    d = pass_checks(tmp_path, case)
    assert str(d["kind"]) == KINDS[case]  # the model ran in its device kernel, not on the host
    if case == "kb":
        assert int(d["n_par"]) == 400  # 200 stills: K and B each
    for name in ("model_g", "model_deriv", "target_phi", "target_gradient", "var_g",
                 "merge_external", "merge_internal", "statistics_sums"):
        assert float(d[name]) <= RTOL, (case, name, float(d[name]))
    for method in ("standard", "simple"):  # the same mask, with rejections to compare
        assert int(d[f"outliers_{method}_n"]) > 0
        assert int(d[f"outliers_{method}_differ"]) == 0
    # robust and variational merging (Gaussian and Student-t likelihoods, centric and
    # acentric groups, Sigma(d) by a few EM iterations) through the functions a run calls
    for name in ("merge_robust", "merge_variational", "merge_variational_t"):
        assert float(d[name]) <= RTOL, (case, name, float(d[name]))
        assert int(d[f"{name}_n"]) > 20
    assert int(d["robust_reweighted"]) > 10 and int(d["robust_fallback_differ"]) == 0
    assert int(d["variational_centric"]) > 0 and int(d["variational_em_iterations"]) >= 2
    # the error-model sums: ML profile likelihood (value and slope of b), the binned sums of
    # the DIALS functional, and both refinements' (a, b) with every evaluation on the device
    for name in ("error_model_ml_sums", "error_model_ml_slope", "error_model_binned_sums",
                 "error_model_ml_ab", "error_model_individual_ab"):
        assert float(d[name]) <= RTOL, (case, name, float(d[name]))
    assert int(d["error_model_bins"]) >= 3
    assert int(d["error_model_ml_used_device"]) == 1
    assert int(d["error_model_individual_used_device"]) == 1
    # issue 12: a second refinement's device sums upload no observation array again (the
    # job table holds them: backends/cuda_job_table.py) and give the same (a, b)
    for name in ("ml", "individual"):
        # the first: at least I, sigma^2 and g of every row
        assert int(d[f"error_model_{name}_first_upload_bytes"]) >= 3 * 8 * int(
            d["error_model_rows"])
        assert int(d[f"error_model_{name}_second_calls"]) >= 1
        assert int(d[f"error_model_{name}_second_upload_bytes"]) == 0
        assert float(d[f"error_model_{name}_repeat"]) == 0.0
    # g and var(g) of every configured row (ScalingRun.expand), chunks splitting datasets
    assert int(d["expand_on_device"]) == 1
    assert int(d["expand_rows"]) >= int(d["n_obs"])
    assert float(d["expand_g"]) <= RTOL and float(d["expand_var_g"]) <= RTOL
    # a tiny forced batch size: whole-group batches on two streams, uploads per batch
    assert int(d["streamed_batches"]) >= 5 and int(d["streamed_streams"]) == 2
    assert float(d["streamed_vs_one"]) <= RTOL and float(d["streamed_vs_cpu"]) <= RTOL
    if case == "kb":
        return
    for name in ("normal_phi", "normal_rhs", "normal_matrix"):
        assert float(d[name]) <= RTOL, (case, name, float(d[name]))
    if case in ("kb_normal", "array"):
        assert int(d["normal_segments"]) == 3
        # the program job's key-block segments (issue 11) against the CPU as well
        assert int(d["normal_key_block_segments"]) >= 1
        assert float(d["normal_key_blocks"]) <= RTOL, float(d["normal_key_blocks"])
    normal, rhs = dense_normal_equations(d)
    scale = np.max(np.abs(normal))
    assert np.max(np.abs(d["normal_device"] - normal)) <= RTOL * scale
    assert np.max(np.abs(d["rhs_device"] - rhs)) <= RTOL * np.max(np.abs(rhs))
    assert np.count_nonzero(np.abs(normal) > 1e-12 * scale) > 3 * normal.shape[0]  # coupled
