"""The numba.cuda twins agree with the CPU kernels and a numpy reference (CUDA simulator).

The simulator must be enabled before numba.cuda is first imported, so the device code runs in
one subprocess with NUMBA_ENABLE_CUDASIM=1: it reads the inputs from an .npz, writes the device
results to another, and every assertion is made here against references computed in this
process.
"""

import os
import subprocess
import sys
import textwrap

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.scaling.target import target_and_gradient

N_GROUPS = 300
N_SLOTS = 5
N_PARAMS = 12
UNTOUCHED_PARAM = 11

SIMULATOR_SCRIPT = textwrap.dedent(
    """
    import sys
    import dials_vmerge
    import numpy as np
    from dials_vmerge.backends import cuda_target as ct
    from dials_vmerge.backends.select import choose_device

    d = dict(np.load(sys.argv[1]))
    out = {}
    args = (d["intensity"], d["weight"], d["g"], d["deriv_values"], d["deriv_index"],
            d["group_start"], int(d["n_params"]))
    out["phi"], out["grad"] = ct.evaluate_target_cuda(*args)
    plan = ct.CudaTargetPlan(d["intensity"], d["weight"], d["deriv_index"], d["group_start"],
                             int(d["n_params"]))
    out["phi_again"], out["grad_again"] = plan.evaluate(d["g"], d["deriv_values"])
    out["phi_again2"], out["grad_again2"] = plan.evaluate(d["g"], d["deriv_values"])
    out["n_segments"] = plan.n_segments
    out["ih"] = ct.merged_intensity_cuda(d["intensity"], d["weight"], d["g"], d["group_start"])
    out["mean"], out["sigma"] = ct.merged_means_cuda(d["intensity"], d["weight"],
                                                     d["group_start"])
    out["mean_dr"], out["sigma_dr"] = ct.merged_means_cuda(
        d["intensity"], d["weight"], d["group_start"], sigma_dynamic_range=1e-6)
    hand = ("hand_intensity", "hand_weight", "hand_g", "hand_deriv_values", "hand_deriv_index",
            "hand_group_start")
    out["hand_phi"], out["hand_grad"] = ct.evaluate_target_cuda(*(d[k] for k in hand), 2)
    out["hand_mean"], out["hand_sigma"] = ct.merged_means_cuda(
        d["hand_intensity"], d["hand_weight"], d["hand_group_start"])
    bad_index = d["deriv_index"].copy()
    bad_index[0, 0] = int(d["n_params"])
    try:
        ct.evaluate_target_cuda(*args[:4], bad_index, *args[5:])
        out["bad_index_rejected"] = False
    except ValueError:
        out["bad_index_rejected"] = True
    out["auto_device"] = choose_device("auto")
    np.savez(sys.argv[2], **out)
    """
)


def random_problem(seed=11):
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(1, 13, N_GROUPS)  # mean 6.5: ~2000 observations
    multiplicity[7] = 0  # an empty group
    multiplicity[20] = 3
    multiplicity[40] = 4
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n = int(group_start[-1])
    weight = rng.uniform(0.2, 3.0, n)
    weight[group_start[20]:group_start[21]] = 0.0  # a group with no information on Ih
    weight[group_start[40]] = 1e16  # sigma 1e-8: below the classical dynamic range of its group
    deriv_index = rng.integers(-1, UNTOUCHED_PARAM, (n, N_SLOTS)).astype(np.int32)
    return {
        "intensity": rng.exponential(500.0, n) + rng.normal(0.0, 20.0, n),
        "weight": weight,
        "g": rng.uniform(0.4, 1.6, n),
        "deriv_values": rng.normal(0.0, 1.0, (n, N_SLOTS)),
        "deriv_index": deriv_index,
        "group_start": group_start,
        "n_params": np.int64(N_PARAMS),
        # Hand case: one group I = 10, 22, w = 1, 0.5, g = 1, 2; obs 0 has dg/dp0 = 1,
        # obs 1 has dg/dp1 = 2. Ih = 32/3, r = -2/3, 2/3, phi = 4/9 + 0.5*4/9 = 2/3,
        # dPhi/dp0 = -2*1*(-2/3)*(32/3)*1 = 128/9, dPhi/dp1 = -2*0.5*(2/3)*(32/3)*2 = -128/9.
        # Merged mean (w only) = (10 + 11)/1.5 = 14, sigma = sqrt(1/1.5).
        "hand_intensity": np.array([10.0, 22.0]),
        "hand_weight": np.array([1.0, 0.5]),
        "hand_g": np.array([1.0, 2.0]),
        "hand_deriv_values": np.array([[1.0, 0.0], [2.0, 0.0]]),
        "hand_deriv_index": np.array([[0, -1], [1, -1]], dtype=np.int32),
        "hand_group_start": np.array([0, 2], dtype=np.int64),
    }


def numpy_reference(p):
    """(phi, gradient, gradient rounding scale, Ih) by bincount, independent of the kernels."""
    group_start = p["group_start"]
    n_groups = group_start.size - 1
    grp = np.repeat(np.arange(n_groups), np.diff(group_start))
    w, g, intensity = p["weight"], p["g"], p["intensity"]
    s_wgi = np.bincount(grp, w * g * intensity, minlength=n_groups)
    s_wgg = np.bincount(grp, w * g * g, minlength=n_groups)
    ih = np.divide(s_wgi, s_wgg, out=np.zeros(n_groups), where=s_wgg > 0)
    r = intensity - g * ih[grp]
    factor = -2.0 * w * r * ih[grp]
    cols = p["deriv_index"].astype(np.int64)
    used = cols >= 0
    terms = (factor[:, None] * p["deriv_values"])[used]
    gradient = np.bincount(cols[used], terms, minlength=N_PARAMS)
    scale = np.bincount(cols[used], np.abs(terms), minlength=N_PARAMS)
    return float(np.sum(w * r * r)), gradient, scale, ih


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    problem = random_problem()
    tmp = tmp_path_factory.mktemp("cudasim")
    inputs, outputs = tmp / "in.npz", tmp / "out.npz"
    np.savez(inputs, **problem)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-c", SIMULATOR_SCRIPT, str(inputs), str(outputs)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return problem, dict(np.load(outputs))


def test_problem_size_is_as_intended(simulated):
    problem, out = simulated
    assert 1500 < problem["intensity"].size < 2500
    assert out["n_segments"] > 1  # the gradient is really split into partial rows


def test_target_gradient_match_cpu_kernel_and_numpy(simulated):
    problem, out = simulated
    phi_ref, grad_ref, scale, _ = numpy_reference(problem)
    phi_cpu, grad_cpu = target_and_gradient(
        problem["intensity"], problem["weight"], problem["g"], problem["deriv_values"],
        problem["deriv_index"], problem["group_start"], N_PARAMS)
    for phi, grad in ((phi_cpu, grad_cpu), (phi_ref, grad_ref)):
        assert abs(float(out["phi"]) - phi) <= 1e-12 * phi
        # Summation orders differ, so each component agrees to rounding of its own terms.
        assert np.all(np.abs(out["grad"] - grad) <= 1e-12 * scale)
    assert np.max(np.abs(grad_ref[:UNTOUCHED_PARAM])) > 1.0  # a gradient with substance
    assert out["grad"][UNTOUCHED_PARAM] == 0.0  # no observation touches this parameter


def test_evaluation_is_bitwise_reproducible(simulated):
    _, out = simulated
    assert float(out["phi_again"]) == float(out["phi"])
    assert float(out["phi_again2"]) == float(out["phi"])
    assert np.array_equal(out["grad_again"], out["grad"])
    assert np.array_equal(out["grad_again2"], out["grad"])


def test_merged_intensity_matches_cpu_ih_table(simulated):
    from dials_vmerge.scaling.ih_table import chunk_bounds, merged_intensity_kernel

    problem, out = simulated
    _, _, _, ih_ref = numpy_reference(problem)
    ih_cpu = np.empty(N_GROUPS)
    merged_intensity_kernel(problem["intensity"], problem["weight"], problem["g"],
                            problem["group_start"], chunk_bounds(problem["group_start"], 1),
                            ih_cpu)
    np.testing.assert_allclose(out["ih"], ih_cpu, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["ih"], ih_ref, rtol=1e-12, atol=0)
    assert out["ih"][20] == 0.0 and out["ih"][7] == 0.0  # zero-weight and empty groups


def test_hand_computed_group(simulated):
    _, out = simulated
    assert float(out["hand_phi"]) == pytest.approx(2.0 / 3.0, rel=1e-14)
    np.testing.assert_allclose(out["hand_grad"], [128.0 / 9.0, -128.0 / 9.0], rtol=1e-14)
    assert out["hand_mean"][0] == pytest.approx(14.0, rel=1e-15)
    assert out["hand_sigma"][0] == pytest.approx(np.sqrt(1.0 / 1.5), rel=1e-15)


def test_merged_means_match_numpy(simulated):
    problem, out = simulated
    group_start = problem["group_start"]
    grp = np.repeat(np.arange(N_GROUPS), np.diff(group_start))
    w = problem["weight"]
    s_w = np.bincount(grp, w, minlength=N_GROUPS)
    s_wi = np.bincount(grp, w * problem["intensity"], minlength=N_GROUPS)
    has = s_w > 0
    np.testing.assert_allclose(out["mean"][has], s_wi[has] / s_w[has], rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["sigma"][has], np.sqrt(1.0 / s_w[has]), rtol=1e-12, atol=0)
    assert np.all(out["mean"][~has] == 0.0) and np.all(out["sigma"][~has] == 0.0)
    assert set(np.flatnonzero(~has)) == {7, 20}


def test_merged_means_dynamic_range_matches_classical_merge(simulated):
    classical = pytest.importorskip("dials_vmerge.merging.classical")
    problem, out = simulated
    w = problem["weight"]
    has_weight = w > 0
    group_start = problem["group_start"]
    grp = np.repeat(np.arange(N_GROUPS), np.diff(group_start))
    # The classical kernel takes sigmas; zero-weight observations are simply not given to it.
    keep = np.flatnonzero(has_weight)
    counts = np.bincount(grp[keep], minlength=N_GROUPS)
    kept_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    mean_cl, sigma_cl = classical.inverse_variance_merge_kernel(
        problem["intensity"][keep], 1.0 / np.sqrt(w[keep]), kept_start, 1e-6, False)
    np.testing.assert_allclose(out["mean_dr"], mean_cl, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["sigma_dr"], sigma_cl, rtol=1e-12, atol=0)
    # The sigma-1e-8 observation of group 40 dominates without the cut and is dropped with it.
    assert out["mean"][40] == pytest.approx(problem["intensity"][group_start[40]], rel=1e-9)
    assert abs(out["mean_dr"][40] - out["mean"][40]) > 1e-3 * abs(out["mean"][40])


def test_out_of_range_parameter_index_is_rejected(simulated):
    _, out = simulated
    assert bool(out["bad_index_rejected"])


def test_auto_device_is_cuda_under_the_simulator(simulated):
    _, out = simulated
    assert str(out["auto_device"]) == "cuda"
