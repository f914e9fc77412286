"""Issue 12: after a scaling job's first round, a round's minimisation table is made on the
device from the job's resident columns (backends/cuda_resident_inputs.py,
kernels/cuda/resident_rows.py): no array with a row per observation crosses the bus except a
one-byte keep flag per job row, and only in a round whose subset changed.

Small simulator jobs (tests/cuda_resident_runs.py, NUMBA_ENABLE_CUDASIM=1): 20 KB stills
with outliers rejected between rounds (also with the column entries' count budget lowered so
that every round's gradient column entries take the radix plan of few segments and many
columns, which until then went up from the host every round), and two physical and two
array-model sweeps whose table is a subset (an Isigma cut, outliers), and a job of three
model families (physical with and without absorption, KB: backends/cuda_mixed_models.py).
Checked here, from an independent record of every host->device copy at the numba.cuda API
(dtype and shape; tests/cuda_transfer_recorder.py): the rounds after the first copy no
float array with a row per observation and no integer one but the keep flags; the job
table's counter agrees with the record; g and the scaled intensities equal the CPU run to
1e-10 relative, and (KB, array) the run that uploads each round's table bitwise (kb_radix:
and the one-pass plan's run). The kernels' derivations themselves (subset rows, group
offsets, column entries) are checked against the host's in
tests/test_cuda_resident_kernels.py."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
RTOL = 1e-10  # the bar (device and CPU sums add in different orders)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resident") / "runs.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "cuda_resident_runs.py"),
                          str(out), "kb", "kb_radix", "physical", "array", "mixed"], env=SIM,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.load(open(out))


NAMES = ["kb", "kb_radix", "physical", "array", "mixed"]


@pytest.mark.parametrize("name", NAMES)
def test_later_rounds_copy_no_observation_array(runs, name):
    result = runs[name]
    rounds, job_rows = result["rounds"], result["job_rows"]
    kind = {"kb": "kb", "kb_radix": "kb", "physical": "physical", "array": "array",
            "mixed": "mixed"}[name]
    if name == "kb_radix":  # every round's entries made by the radix plan, several passes
        assert len(result["plans"]) >= len(rounds)
        assert all(p[0] == "radix" and p[2] >= 2 for p in result["plans"]), result["plans"]
    assert len(rounds) >= 3
    assert all(r["kind"] == kind and r["resident"] for r in rounds), rounds
    if kind in ("physical", "array"):  # a full-matrix round: its normal equations too
        assert any(r["normal_calls"] for r in rounds)
    smallest_table = min(r["table_rows"] for r in rounds)
    # a per-observation array: as many rows as the smallest table, far above the
    # parameter-sized copies (n_par + guard, 64 check samples come back, never go up)
    assert smallest_table > 4 * max(r["n_par"] + 8 for r in rounds)
    if kind == "mixed":
        # a family's arrays have only its rows: as many as the smallest family's in a
        # round's table, still above every parameter-sized copy (at most every model's
        # parameters and the guard)
        smallest_table = min(min(r["family_rows"]) for r in rounds)
        assert smallest_table > max(r["n_full"] + 8 for r in rounds)
    copies = defaultdict(list)
    for pass_name, call, nbytes, dtype_kind, shape in result["copies"]:
        if pass_name == "scaling target":
            copies[call].append((nbytes, dtype_kind, shape))
    assert len(copies) == len(rounds)
    # the first round: the job's columns go up (I, sigma^2, the group sort, the model's
    # per-row inputs in job order)
    first = [c for c in copies[0] if c[2] and c[2][0] >= smallest_table]
    assert sum(1 for c in first if c[1] == "f") >= 3
    keep_uploads = 0
    for k in range(1, len(rounds)):
        large = [c for c in copies[k] if c[2] and c[2][0] >= smallest_table]
        # nothing with a row per observation but the keep flags (uint8, one per job row) ...
        assert all(c[1] == "u" and c[2] == [job_rows] and c[0] == job_rows
                   for c in large), (k, large)
        assert len(large) <= 1
        keep_uploads += len(large)
        # ... which go up whenever the subset changed
        if rounds[k]["table_rows"] != rounds[k - 1]["table_rows"]:
            assert len(large) == 1, k
    # these jobs do change their subset after the first round (outliers, then the cut)
    assert keep_uploads >= 1
    # the job table's counter saw every copy the API saw, and names them
    counted = result["transfers"]["scaling target"]["calls"]
    for k, call in enumerate(counted):
        assert call["observation_bytes"] + call["parameter_bytes"] == sum(
            c[0] for c in copies[k]), k
    first_input = {"kb": "row_dataset", "physical": "record", "array": "weights",
                   "mixed": "0 physical record"}[kind]
    assert {f"job model inputs ({kind}) {first_input}", "job layout order",
            "minimisation keep"} <= set(counted[0]["uploaded"])
    for call in counted[1:]:
        assert set(call["uploaded"]) <= {"minimisation keep"}, call
        assert call["observation_bytes"] in (0, job_rows)


@pytest.mark.parametrize("name", NAMES)
def test_resident_rounds_equal_cpu_run(runs, name):
    g, i = (np.asarray(runs[name][k]) for k in ("g", "i"))
    np.testing.assert_allclose(g[1], g[0], rtol=RTOL, atol=0)
    # atol: scaled intensities near zero, where a relative bar means nothing (1e-12 is far
    # below any intensity's sigma)
    np.testing.assert_allclose(i[1], i[0], rtol=RTOL, atol=1e-12)
    assert np.std(g[0]) > 1e-3 * np.mean(g[0])  # the models did scale something
    if name not in ("physical", "mixed"):  # the run that uploads each round's table: the
        # same arrays (mixed: the uploaded and gathered inputs, tests/test_cuda_mixed_models)
        assert not any(r["resident"] for r in runs[name]["upload_rounds"])
        assert np.array_equal(g[2], g[1]) and np.array_equal(i[2], i[1])
    if name == "kb_radix":  # the same entries as the one-pass plan: the same arithmetic
        assert np.array_equal(g[3], g[1]) and np.array_equal(i[3], i[1])


def test_mixed_job_evaluates_each_family_on_the_device(runs):
    """A job of three model families (DIALS's automatic choice per sweep: physical with
    absorption, physical without, KB): every round's g and dg/dp come from the families'
    device kernels on resident inputs (not host-evaluated models uploaded per call), the
    expansion too (it copies nothing with a row per observation), and the log says so."""
    result = runs["mixed"]
    for r in result["rounds"]:
        assert r["families"] == ["kb", "physical", "physical"], r
    log = "\n".join(result["log"])
    assert "device target: mixed model" in log and "host-model" not in log
    assert "model evaluation (KB, physical, array, and jobs mixing them" in log
    uploaded = set(result["transfers"]["scaling target"]["calls"][0]["uploaded"])
    assert {f"job model inputs (mixed) {f}" for f in
            ("0 physical absorption", "1 physical record", "2 kb inv_two_d_sq")} <= uploaded
    assert not any(r.startswith("job model inputs (mixed) 1 physical absorption")
                   for r in uploaded)  # the second family: no absorption terms
    expansion = result["transfers"]["expansion"]["calls"]
    assert len(expansion) >= 2 and all(c["observation_bytes"] == 0 for c in expansion)
    assert not any(p == "expansion" and len(shape) and shape[0] >= result["job_rows"] // 2
                   for p, _, _, _, shape in result["copies"])
