"""Issue 12: jobs whose datasets form several model families (KB stills and physical sweeps,
physical sweeps with and without absorption, array models) evaluate g and dg/dp on the
device, one family kernel per family scattered into the job's combined table
(backends/cuda_mixed_models.py, kernels/cuda/families.py), instead of on the host.

Kernel level (tests/cuda_mixed_checks.py under the CUDA simulator): a five-dataset layout
(KB; physical with absorption on datasets 1 and 4, 4 without decay; physical without
absorption; array), a
random subset of rows in random order and random groups: device g, the dense Jacobian, Phi
and gradient, the normal equations and var(g) against the CPU's ModelFamilies and CPU
kernels; both with the table's inputs uploaded from the host and gathered on the device
from each family's resident job-order inputs. Also the expansion of g and var(g) of every
row (backends/cuda_expand.py) against the CPU's evaluate_all_rows, resident and streamed."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
RTOL = 1e-10  # the bar


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "checks.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_mixed_checks.py"),
                          str(out)], env=SIM, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.load(open(out))


def test_family_plan_of_a_mixed_job(checks):
    assert checks["applies"]
    assert checks["plan"] == [["kb", [0]], ["physical", [1, 4]], ["physical", [2]],
                              ["array", [3]]]


@pytest.mark.parametrize("how", ["host", "resident"])
def test_device_families_equal_cpu_model_families(checks, how):
    r = checks[how]
    assert r["families"] == ["array", "kb", "physical", "physical"]
    # every free parameter is reached by some row: the comparison covers all columns
    assert r["jacobian_columns_used"] == r["n_par"] and r["n_rows"] > 100
    assert r["width"] >= 6 + 9  # the widest family's slots (physical with absorption)
    for key in ("g_rel", "jacobian_rel", "phi_rel", "grad_rel", "var_rel"):
        assert r[key] <= RTOL, (key, r[key])
    if how == "host":
        for key in ("normal_phi_rel", "rhs_rel", "normal_rel"):
            assert r[key] <= RTOL, (key, r[key])
    assert r["unused_slots_zero"] and r["g_only_equal"]
    # the combined columns made on the device equal the host's layout exactly
    assert r["cols_equal_host"]
    if how == "resident":
        assert r["positions_equal_host"]


def test_resident_split_refuses_a_table_the_host_counts_otherwise(checks):
    assert checks["resident_refuses_other_counts"]


@pytest.mark.parametrize("how", ["resident", "streamed"])
def test_expansion_of_a_mixed_job_on_the_device(checks, how):
    """g and var(g) of every configured row of the five datasets (chunks of 300 rows that
    cross datasets and families) equal the CPU's evaluate_all_rows; resident: the families'
    job-order inputs go up once (the g-only call copies nothing with a row per
    observation); streamed: each chunk's per-family inputs are copied per call."""
    r = checks["expansion"][how]
    assert r["done"] and r["rows"] > 600
    for key in ("g_rel", "var_rel", "g_alone_rel"):
        assert r[key] <= RTOL, (key, r[key])
    if how == "resident":
        assert r["observation_bytes"][0] > 0 and r["observation_bytes"][1:] == [0]
        assert all(u.startswith("job model inputs (mixed) ") for u in r["uploaded"])
    else:
        assert all(b > 0 for b in r["observation_bytes"])
        assert "expansion:1 physical absorption" in r["uploaded"]
