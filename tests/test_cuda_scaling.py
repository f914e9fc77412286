"""compute.device=cuda in the real run, under the CUDA simulator (issue 12).

The simulator must be on before numba.cuda is first imported, so the runs happen in
subprocesses (tests/cuda_simulator_runs.py and the dials.vmerge program); every assertion is
made here. The shadow comparison evaluates the CPU target at the same parameters as every
device evaluation of the scaling job, so each CUDA kernel of the run (model, target, gradient,
var(g)) is compared with its CPU twin on the layouts the run really builds.
"""

import os
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
EXAMPLES = os.path.join(ROOT, "examples")
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
# Independent summation orders (device tree and segments vs CPU chunks) differ by rounding:
# 1e-10 relative is the bar; the differences seen are ~1e-14.
RTOL = 1e-10


def simulator_runs(tmp_path, size, *cases):
    out = tmp_path / f"{size}.npz"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_simulator_runs.py"),
                          str(out), size, *cases], env=SIM, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(np.load(out)), run.stderr


def check_runs(results, log, names=("kb", "physical")):
    assert "scaling target and gradient kernels run on the CUDA device (numba CUDA simulator)" in log
    for name, kind in ((n, n) for n in names):
        shadow = results[f"{name}_shadow"]
        assert str(results[f"{name}_kinds"][0]) == kind
        assert shadow.shape[0] >= 5  # a whole job: several rounds of evaluations
        phi_rel, grad_rel, g_rel, var_rel, deriv_rel = shadow.max(axis=0)
        assert phi_rel <= RTOL and grad_rel <= RTOL, (name, phi_rel, grad_rel)
        assert g_rel <= RTOL and var_rel <= RTOL and deriv_rel <= RTOL, (name, g_rel, var_rel)
        # The whole job: same inverse scales and scaled intensities as the CPU run.
        cpu, gpu = results[f"{name}_g"]
        np.testing.assert_allclose(gpu, cpu, rtol=RTOL, atol=0)
        cpu, gpu = results[f"{name}_i"]
        np.testing.assert_allclose(gpu, cpu, rtol=RTOL, atol=1e-12)
        assert np.std(cpu) > 0.01 * np.mean(cpu) if name == "kb" else True
    if "kb" not in names:
        return
    # A tiny forced batch size: many batches of whole groups (on two CUDA streams), the same
    # result as one batch, the whole job through (expansion, outliers, merging included).
    assert results["kb_batched_n_batches"].max() > 5
    assert results["kb_batched_shadow"].max(axis=0)[1] <= RTOL
    np.testing.assert_allclose(results["kb_batched_g"], results["kb_g"][1], rtol=RTOL, atol=0)
    np.testing.assert_allclose(results["kb_batched_i"], results["kb_i"][1], rtol=RTOL,
                               atol=1e-12)


def test_small_kb_job_matches_cpu(tmp_path):
    results, log = simulator_runs(tmp_path, "small", "kb")
    check_runs(results, log, ("kb",))


# The physical job takes ~50 s under the simulator (every launch costs ~50 ms there, and a
# full-matrix job makes hundreds). In CI the physical model's device run is covered end to
# end by test_quartz_cuda_run_equals_cpu_run (scaled.refl and merged.mtz to 1e-10, LevMar
# included) and pass by pass by tests/test_cuda_passes.py on the quartz layout.
@pytest.mark.slow
def test_small_physical_job_matches_cpu(tmp_path):
    results, log = simulator_runs(tmp_path, "small", "physical")
    check_runs(results, log, ("physical",))


# A job of three model families (the automatic models of a 69-degree, a 34.5-degree and a
# 0.7-degree sweep: physical with absorption, physical without, KB) with a full-matrix
# round: every device evaluation (each family's kernel scattered into one table) shadowed by
# the CPU's ModelFamilies and target; ~1 min under the simulator (the LevMar round's
# normal equations). CI covers the mixed job's rounds in test_cuda_resident_rounds.py and
# its kernels, normal equations included, in test_cuda_mixed_models.py.
@pytest.mark.slow
def test_mixed_family_job_matches_cpu(tmp_path):
    results, log = simulator_runs(tmp_path, "small", "mixed")
    check_runs(results, log, ("mixed",))
    assert "device target: mixed model" in log and "host-model" not in log
    assert "LevMar" in log  # the full-matrix round's normal equations on the mixed table


def run_vmerge(directory, *args, env=None, record=None):
    """dials.vmerge on the quartz example; record: a path where every host->device copy of
    the run is written (tests/cuda_transfer_recorder.py, simulator runs only)."""
    os.makedirs(directory, exist_ok=True)
    program = ("import sys; from dials_vmerge.command_line.vmerge import main; "
               "sys.exit(main())")
    if record is not None:
        program = (f"import sys; sys.path.insert(0, {HERE!r}); import dials_vmerge; "
                   "import cuda_transfer_recorder as r; r.install(); "
                   "from dials_vmerge.command_line.vmerge import main; code = main(); "
                   f"r.dump({str(record)!r}); sys.exit(code)")
    return subprocess.run(
        [sys.executable, "-c", program, os.path.join(EXAMPLES, "integrated.expt"),
         os.path.join(EXAMPLES, "integrated.refl"), *args],
        env=env or os.environ, capture_output=True, text=True, cwd=directory, timeout=1200)


def test_cuda_without_gpu_is_one_line_and_exit_1(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    run = run_vmerge(tmp_path, "compute.device=cuda", env=env)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "dials.vmerge: error: compute.device=cuda: no GPU visible to numba "
        "(see dials.vmerge.devices)"]
    assert not any(f.endswith((".refl", ".mtz", ".expt")) for f in os.listdir(tmp_path))


def test_devices_names_simulator_and_kernels_compile():
    run = subprocess.run([sys.executable, "-c", "import sys; from dials_vmerge.command_line."
                          "devices import main; sys.exit(main())"], env=SIM,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "CUDA:                 available: numba CUDA simulator" in run.stdout
    assert "CUDA kernels:         compile and agree with the CPU" in run.stdout
    assert "numba-cuda:" in run.stdout


# The quartz run of the test 2, cut so that the simulator finishes it in about a
# minute: the simulator interprets every kernel in Python, and the full data's run (two
# LBFGS rounds, 9 LevMar iterations whose normal-matrix pass is O(n x columns^2)) took
# 6 minutes. A 1.0 A cut keeps ~250 of 1518 reflections and every stage of the run; at most
# three LevMar iterations per full-matrix round (the same options for both runs).
QUARTZ_CUT = ("cut_data.d_min=1.0", "scaling_refinery.full_matrix_max_iterations=3")


def test_quartz_cuda_run_equals_cpu_run(tmp_path):
    """The issue's test 2: scaled.refl columns and merged.mtz of the quartz example, CPU vs
    CUDA (simulator), 1e-10 relative; the log says the kernels ran on the device, the
    full-matrix round included."""
    from dials_vmerge.io import read_reflections
    from iotbx import mtz

    cpu = run_vmerge(tmp_path / "cpu", "compute.device=cpu", *QUARTZ_CUT)
    assert cpu.returncode == 0, cpu.stderr
    gpu = run_vmerge(tmp_path / "gpu", "compute.device=cuda", *QUARTZ_CUT, env=SIM,
                     record=tmp_path / "uploads.json")
    assert gpu.returncode == 0, gpu.stderr
    assert "kernels run on the CUDA device (numba CUDA simulator)" in gpu.stdout
    assert "device target: physical model" in gpu.stdout
    assert "LevMar" in gpu.stdout  # the normal equations ran on the device too
    assert ("g and var(g) of every reflection, outlier rejection, the error-model sums, "
            "merging (classical, robust, variational)") in gpu.stdout
    a = read_reflections(str(tmp_path / "cpu" / "scaled.refl"))
    b = read_reflections(str(tmp_path / "gpu" / "scaled.refl"))
    assert sorted(a.keys()) == sorted(b.keys()) and a.nrows == b.nrows
    for key in a.keys():
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=RTOL, atol=0, err_msg=key)
        else:
            assert np.array_equal(x, y), key
    ma = mtz.object(str(tmp_path / "cpu" / "merged.mtz"))
    mb = mtz.object(str(tmp_path / "gpu" / "merged.mtz"))
    for ca, cb in zip(ma.columns(), mb.columns()):
        assert ca.label() == cb.label()
        np.testing.assert_allclose(np.array(cb.extract_values()),
                                   np.array(ca.extract_values()), rtol=RTOL, atol=0,
                                   err_msg=ca.label())
    check_device_transfers(tmp_path / "gpu" / "dials.vmerge.json", tmp_path / "uploads.json",
                           gpu.stdout)
    check_statistics_equal(cpu.stdout, gpu.stdout, tmp_path / "cpu" / "dials.vmerge.json",
                           tmp_path / "gpu" / "dials.vmerge.json")


def statistics_block(log):
    """The log's statistics table and summary (the CC1/2 fit's limit line included)."""
    start = log.index("Merging statistics by resolution bin")
    return log[start:log.index("Total unique", start)]


def check_statistics_equal(cpu_log, gpu_log, cpu_json, gpu_json):
    """Issue 12: the statistics (their CC1/2 and CCanom sums on the device, the merges and
    Rmerge sums too) print the CPU run's table, and every number of the JSON's statistics
    (shells, overall, anomalous and cut tables) agrees to RTOL."""
    import json
    import math

    assert statistics_block(gpu_log) == statistics_block(cpu_log)
    a = json.load(open(cpu_json))["merging"]["merging_statistics"]
    b = json.load(open(gpu_json))["merging"]["merging_statistics"]
    compared = []

    def compare(x, y, path):
        if isinstance(x, dict):
            assert sorted(x) == sorted(y), path
            for key in x:
                compare(x[key], y[key], f"{path}.{key}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for k, (u, v) in enumerate(zip(x, y)):
                compare(u, v, f"{path}[{k}]")
        elif isinstance(x, float) and isinstance(y, float) and not math.isnan(x):
            # the CC1/2 fit's limit: a minimiser's result, held to its own precision
            # (tests/test_cuda_statistics.py FIT_RTOL)
            tolerance = 1e-6 if path.endswith("d_min_cc_half_fit") else RTOL
            assert abs(y - x) <= tolerance * abs(x), (path, x, y)
            compared.append(path)
        else:
            assert x == y or (x != x and y != y), (path, x, y)

    compare(a, b, "merging_statistics")
    assert sum(p.endswith(".cc_half") for p in compared) >= 20


def check_device_transfers(report_path, uploads_path, log):
    """Issue 12: each observation array crosses the bus once per job. The job table's
    counter (dials.vmerge.json "device_transfers", per pass and call) against an independent
    record of every host->device copy at the numba.cuda API; a second outlier rejection,
    expansion and merging pass copies no observation array again."""
    import json
    from collections import defaultdict

    transfers = json.load(open(report_path))["device_transfers"]
    recorded = defaultdict(int)
    for pass_name, call, nbytes in json.load(open(uploads_path)):
        recorded[pass_name, call] += nbytes
    assert "Device transfers host->device per pass" in log
    for name in ("scaling target", "expansion", "outlier rejection", "merging statistics",
                 "merging"):
        calls = transfers[name]["calls"]
        assert len(calls) >= 2, name
        for k, call in enumerate(calls):
            counted = call["observation_bytes"] + call["parameter_bytes"]
            # the counter sees every copy the API saw (the statistics also copy per-group
            # means, outside the job table: at most the API's count)
            if name == "merging statistics":
                assert counted <= recorded[name, k], (name, k)
            else:
                assert counted == recorded[name, k], (name, k, counted, recorded[name, k])
    outliers = transfers["outlier rejection"]["calls"]
    target = transfers["scaling target"]["calls"]
    # the first scaling round copies the job's I and sigma^2 (its table's I and weights are
    # gathered from them on the device), the job's group sort, the model's per-row inputs
    # in job order and the round's keep flags (the table is made on the device) ...
    assert {"intensity", "variance", "job layout order", "job layout group_start",
            "minimisation keep", "job model inputs (physical) record",
            "job model inputs (physical) first_param"} <= set(target[0]["uploaded"])
    # ... later rounds at most their keep flags (one byte per job row, when the subset
    # changed): never the row order, index arrays, model inputs, I, sigma^2 or weights
    # again (the Imid choice's new I and sigma^2 go up with the outlier rejection that
    # follows it); tests/test_cuda_resident_rounds.py checks this per dtype and shape
    for call in target[1:]:
        assert set(call["uploaded"]) <= {"minimisation keep"}, call
    # the first rejection copies its table's row order and group offsets (I and sigma^2
    # are the scaling target's, g was left on the device by the expansion before it) ...
    assert {"rows", "group_start"} <= set(outliers[0]["uploaded"])
    assert set(outliers[0]["uploaded"]) <= {"rows", "group_start"}
    assert "g" not in outliers[0]["uploaded"]
    assert outliers[0]["observation_bytes"] > 8 * 200
    assert target[0]["observation_bytes"] > 2 * 8 * 200
    # ... the rejection after combine_intensities only the new I and sigma^2 (replaced by
    # the Imid choice), and every later one nothing: g comes from the expansion on the device
    assert set(outliers[1]["uploaded"]) <= {"intensity", "variance"}
    for call in outliers[2:]:
        assert call["observation_bytes"] == 0 and call["uploaded"] == [], call
        assert call["parameter_bytes"] <= 64  # a, b, error-model flag per dataset
    # the expansion reads the scaling rounds' job-order per-row inputs (uploaded once, by
    # the first scaling round) and makes var(g)'s columns on the device: no call copies an
    # observation array (the API's record agrees: counted == recorded above)
    expansion = transfers["expansion"]["calls"]
    for call in expansion:
        assert call["observation_bytes"] == 0 and call["uploaded"] == [], call
    # merging (classical and anomalous) finds I, sigma and both permutations resident from
    # the statistics, which copy each once per distinct subset (sigma > 0; resolution cut)
    for k, call in enumerate(transfers["merging"]["calls"]):
        assert call["observation_bytes"] == 0 and recorded["merging", k] == 0, call
    statistics = transfers["merging statistics"]["calls"]
    intensity_copies = sum(c["uploaded"].count("merging intensity") for c in statistics)
    assert 1 <= intensity_copies <= 2
    # CC1/2 and CCanom ran on the device: their random stream went up, once
    assert sum(c["uploaded"].count("cctbx split stream") for c in statistics) == 1
    assert transfers["scaling target"]["calls"][0]["observation_bytes"] > 0
