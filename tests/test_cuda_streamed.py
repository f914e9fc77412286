"""A scaling layout larger than device memory, streamed from the host (issue 12), under the
CUDA simulator: the runs happen in a subprocess (tests/cuda_streamed_runs.py), every assertion
is made here."""

import os
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
# Against the CPU target (chunked sums vs the device's per-block tree and segments) only the
# summation order differs: the differences seen are ~5e-16 of the largest entry.
RTOL_CPU = 1e-12
# The whole job, streamed (5 batches) vs device-resident (1 batch): the same LBFGS path up to
# rounding of the sums (2.8e-16 seen); 1e-10 is the device-vs-CPU bar.
RTOL_JOB = 1e-10
# Scaled intensities pass through zero (weak and negative observations), where a relative
# bar means nothing: an absolute floor of 1e-12, far below any intensity's rounding here.
ATOL_INTENSITY = 1e-12


def streamed_runs(tmp_path, *mode):
    """tests/cuda_streamed_runs.py in a simulator subprocess: (its results, its stderr)."""
    out = tmp_path / "streamed.npz"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_streamed_runs.py"),
                          str(out), *mode], env=SIM, capture_output=True, text=True,
                         timeout=900, cwd=HERE)
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(np.load(out)), run.stderr


def test_host_streamed_target_and_job_match_device_resident_and_cpu(tmp_path):
    results, stderr = streamed_runs(tmp_path)
    check_kinds(results, ("kb", "physical"))
    assert "streamed from the host in 5 batch(es)" in stderr
    g_resident, g_streamed = results["job_g"]
    np.testing.assert_allclose(g_streamed, g_resident, rtol=RTOL_JOB, atol=0)
    i_resident, i_streamed = results["job_i"]
    np.testing.assert_allclose(i_streamed, i_resident, rtol=RTOL_JOB, atol=ATOL_INTENSITY)
    assert np.std(g_resident) > 0.01 * np.mean(g_resident)  # the scales really moved


def test_array_and_host_evaluated_models_stream(tmp_path):
    """Issue 12: the array model's grids and host-evaluated models (here the array layout
    refused, so g and dg/dp come from the host models batch by batch) stream too, target
    and normal equations."""
    check_kinds(streamed_runs(tmp_path, "array")[0], ("array", "host-model"))


def test_mixed_family_job_streams_with_device_families(tmp_path):
    """A job of three model families (physical with and without absorption, KB): streamed
    from the host (forced with a tiny batch size, or from a memory limit), each batch's rows
    of each family are copied up and evaluated by the family kernels on the device, as the
    resident target does for the whole table: Phi and gradient bit-identical to the resident
    target with the same batches, both equal to the CPU target; the normal equations equal
    the resident pass and the CPU's. The copies recorded at the numba.cuda API carry I, w
    and the families' inputs, never g or dg/dp from the host (which the forced host
    evaluation of the same table does copy)."""
    r, _ = streamed_runs(tmp_path, "mixed")
    # normal equations: the forced tiny batches against the resident pass and the CPU
    check_kinds(r, ("mixed",), normal_pairs=("streamed_cpu", "streamed_resident"))
    n, width = int(r["mixed_n_obs"]), int(r["mixed_width"])
    assert width >= 6 + 9  # the physical family with absorption is the widest
    inputs = 16 * n + int(r["mixed_family_float_bytes"])  # I, w, the families' inputs
    for key in ("streamed", "limited"):
        assert int(r[f"mixed_{key}_ell_calls"]) == 0
        assert int(r[f"mixed_{key}_host_model_uploads"]) == 0
        # two target calls, then (forced tiny batches) one normal-equation call, its
        # partials zeroed once
        calls = list(r[f"mixed_{key}_float_bytes"])
        if key == "streamed":
            assert len(calls) == 3
            calls[2] -= int(r[f"mixed_{key}_normal_zeroed_bytes"])
        else:
            assert len(calls) == 2
        for copied in calls:
            # beyond I, w and the families' inputs only parameters: less than g alone
            assert 0 <= copied - inputs < 8 * n, (key, copied, inputs)
    # the same record sees the host evaluation's g and dg/dp when it is forced
    assert str(r["mixed_host_kind"]) == "host-model"
    assert int(r["mixed_host_ell_calls"]) == 1 and int(r["mixed_host_host_model_uploads"]) == 1
    (copied,) = r["mixed_host_float_bytes"]
    assert copied - 16 * n >= 8 * n * (1 + width)


# ~2 min under the simulator on 2 busy cores (every round's table in 6-7 batches): slow. The
# test above covers the streamed mixed target at the target level.
@pytest.mark.slow
def test_mixed_family_job_streamed_equals_cpu_run(tmp_path):
    """The three-family job through compute.device=cuda with a 300 kB memory limit: every
    scaling round's target streams its table from the host with the families evaluated on
    the device (no host-evaluated g uploaded); g and the scaled intensities equal the CPU
    run's (1e-10)."""
    r, _ = streamed_runs(tmp_path, "mixed-job")
    assert len(r["kinds"]) >= 2 and set(r["kinds"]) == {"mixed"}, r["kinds"]
    assert all(r["host_resident"]) and min(r["n_batches"]) > 1, r["n_batches"]
    assert not bool(r["host_model_uploads"])
    g_cpu, g_streamed = r["g"]
    np.testing.assert_allclose(g_streamed, g_cpu, rtol=RTOL_JOB, atol=0)
    i_cpu, i_streamed = r["i"]
    np.testing.assert_allclose(i_streamed, i_cpu, rtol=RTOL_JOB, atol=ATOL_INTENSITY)
    assert np.std(g_cpu) > 0.01 * np.mean(g_cpu)  # the scales really moved


def check_kinds(results, names,
                normal_pairs=("streamed_cpu", "limited_cpu", "streamed_resident")):
    for name in names:
        assert list(results[f"{name}_kinds"]) == [name] * 3
        # resident, forced streaming, streaming chosen from a tiny device memory limit
        assert list(results[f"{name}_host_resident"]) == [False, True, True]
        n_batches = results[f"{name}_n_batches"]
        assert n_batches[0] == n_batches[1] > 3 and n_batches[2] > 3, n_batches
        assert not results[f"{name}_streamed_has_whole_g"]  # no whole-layout g on the device
        n = int(results[f"{name}_n_par"]) + 1
        for row in results[f"{name}_values"]:  # two parameter points
            resident, streamed, limited, cpu = row.reshape(4, n)
            # same batches, same model kernels per row: bit-identical Phi and gradient
            assert np.array_equal(streamed, resident)
            for device in (resident, streamed, limited):
                assert abs(device[0] - cpu[0]) <= RTOL_CPU * abs(cpu[0])
                scale = np.max(np.abs(cpu[1:]))
                assert np.max(np.abs(device[1:] - cpu[1:])) <= RTOL_CPU * scale
        # the full-matrix round's normal equations over the streamed batches (issue 12),
        # not on the CPU: equal to the CPU kernel and the resident pass to rounding
        assert bool(results[f"{name}_normal_streamed_on_device"])
        assert int(results[f"{name}_normal_size"]) >= 4
        for pair in normal_pairs:
            assert float(results[f"{name}_normal_{pair}"]) <= RTOL_CPU, (name, pair)


# ~2 min under the simulator on 2 busy cores (21-23 batches per round, every launch ~50 ms):
# slow. The quick test above covers the pipeline with a KB job.
@pytest.mark.slow
def test_quartz_streamed_cli_run_equals_cpu_run(tmp_path):
    """dials.vmerge on the quartz example with compute.gpu.device_memory_limit forcing the
    physical layout to be streamed from the host: the same scaled.refl and merged.mtz as the
    CPU run (1e-10 relative; 7e-12 seen, full-matrix rounds included)."""
    from dials_vmerge.io import read_reflections
    from iotbx import mtz

    from test_cuda_scaling import QUARTZ_CUT, run_vmerge

    cpu = run_vmerge(tmp_path / "cpu", "compute.device=cpu", *QUARTZ_CUT)
    assert cpu.returncode == 0, cpu.stderr
    gpu = run_vmerge(tmp_path / "gpu", "compute.device=cuda", *QUARTZ_CUT,
                     "compute.gpu.device_memory_limit=20000", env=SIM)
    assert gpu.returncode == 0, gpu.stderr
    assert "exceeds the device memory: streamed from the host" in gpu.stdout
    a = read_reflections(str(tmp_path / "cpu" / "scaled.refl"))
    b = read_reflections(str(tmp_path / "gpu" / "scaled.refl"))
    assert sorted(a.keys()) == sorted(b.keys()) and a.nrows == b.nrows
    for key in a.keys():
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=RTOL_JOB, atol=0, err_msg=key)
        else:
            assert np.array_equal(x, y), key
    ma = mtz.object(str(tmp_path / "cpu" / "merged.mtz"))
    mb = mtz.object(str(tmp_path / "gpu" / "merged.mtz"))
    for ca, cb in zip(ma.columns(), mb.columns()):
        assert ca.label() == cb.label()
        np.testing.assert_allclose(np.array(cb.extract_values()),
                                   np.array(ca.extract_values()), rtol=RTOL_JOB, atol=0,
                                   err_msg=ca.label())
