"""Issue 12: the CC1/2 and CCanom sums of the merging statistics on the device (kernels.cuda
.statistics, backends.cuda_statistics) against the CPU statistics, under the CUDA simulator
(tests/cuda_statistics_checks.py runs both in a subprocess; every assertion is here).
A small anomalous simulation with a few sigma <= 0, the anomalous table and the suggested
resolution cut: every statistic of every shell, overall and of both extra tables to 1e-10
relative (the Rmerge/Rmeas/Rpim shell sums and CC sums computed on the device), the printed
tables identical, the device half means equal to half_split_kernel's
for every group, and the observations uploaded once per distinct subset."""

import json
import math
import os
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
RTOL = 1e-10  # the bar (the device sums add in a tree, numpy pairwise)
# The suggested limit is a tanh fit's crossing (scitbx's minimiser stops at its own
# convergence tolerance): CC1/2 values 1e-16 apart moved it by 9e-8 relative, so it is held
# to the fit's precision, 1e-6, instead; the cut statistics at it still compare at RTOL.
FIT_RTOL = 1e-6


def _compare(a, b, path, seen):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            _compare(a[key], b[key], f"{path}.{key}", seen)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{k}]", seen)
    elif isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            tolerance = FIT_RTOL if path.endswith("d_min_cc_half_fit") else RTOL
            assert abs(b - a) <= tolerance * abs(a), (path, a, b)
        seen.append(path)
    else:
        assert a == b, (path, a, b)


def test_device_statistics_equal_cpu(tmp_path):
    out = tmp_path / "statistics.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_statistics_checks.py"),
                          str(out)], env=SIM, cwd=HERE, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    d = json.load(open(out))
    cpu, gpu = d["cpu"], d["gpu"]
    # the comparison covers what the device computes: CC1/2 and CCanom of shells and
    # overall, with the anomalous table and the cut statistics present
    assert cpu["cut_statistics"] is not None and cpu["anomalous_statistics"] is not None
    assert cpu["overall"]["cc_half"] > 0.5 and cpu["overall"]["cc_anom_n_pairs"] > 100
    seen = []
    _compare(cpu, gpu, "statistics", seen)
    assert sum(p.endswith(".cc_half") for p in seen) >= 3 * 7
    assert sum(p.endswith(".cc_anom") for p in seen) >= 3 * 7
    assert sum(p.endswith(".r_meas") for p in seen) >= 3 * 7
    assert d["gpu_table"] == d["cpu_table"]
    # every shell's sums ran on the device (shells + overall, four tables: the main one,
    # its anomalous table, the cut data's and its anomalous table), the Rmerge sums from
    # the deviation sums the device had left there
    calls = d["device_calls"]
    assert calls["rmerge"] >= 4 * 7 and calls["rmerge_resident"] == calls["rmerge"]
    assert calls["cc_half"] == calls["rmerge"]
    # CCanom once per shell for a table and its anomalous table (the same observations,
    # groupings and draws: merging.statistics memoises it since issue 10)
    assert 2 * calls["cc_anom"] == calls["rmerge"]
    # the device's half means are half_split_kernel's (the same draws and sums)
    assert d["n_split_groups_False"] > 500 and d["n_split_groups_True"] > 500
    assert d["half_means_max_rel"] <= RTOL
    # the observations went up once per distinct subset (sigma > 0; the cut data); every
    # shell's call after that copies per-group draw tables and six sums' means only
    calls = d["transfers"]["merging statistics"]["calls"]
    uploads = [role for call in calls for role in call["uploaded"]]
    for role in ("merging intensity", "merging sigma", "merging order (anomalous)",
                 "merging order (non-anomalous)"):
        assert 1 <= uploads.count(role) <= 2, (role, uploads)
    assert uploads.count("cctbx split stream") == 1
    assert len(calls) > 40
    assert sum(call["observation_bytes"] for call in calls) <= 8 * 8 * d["n_obs"]
