"""The CUDA job table (backends/cuda_job_table.py) under the CUDA simulator: a resident
column is reused while its host arrays are the same and unchanged, re-uploaded when they are
replaced or edited (at a sampled position, or announced with invalidate), gathers and the
error-model weights on the device equal numpy, and content-compared roles keep two slots.
The checks run in a subprocess (the simulator must be on before numba.cuda is imported);
the results come back as JSON and every assertion is made here."""

import json
import os
import subprocess
import sys

import numpy as np

SIM = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")

SCRIPT = r"""
import json, sys
import dials_vmerge
import numpy as np
from dials_vmerge.backends.cuda_job_table import DeviceJobTable
from dials_vmerge.scaling.error_model import BasicErrorModel

out = {}
store = DeviceJobTable()
rng = np.random.default_rng(3)
a, b = rng.normal(size=1000), rng.normal(size=700)
with store.counting("pass"):
    store.begin_call()
    first = store.column("x", [a, b])
    store.begin_call()
    out["same_object"] = store.column("x", [a, b]) is first
    a[60] = 5.0  # in place, at a sampled position (every (len // 64)-th value: 15)
    edited = store.column("x", [a, b])
    out["edit_reuploaded"] = edited is not first
    out["edit_value"] = float(edited.copy_to_host()[60])
    a[1] = 7.0  # in place, between samples: needs invalidate
    out["unsampled_edit_missed"] = store.column("x", [a, b]) is edited
    store.invalidate("x")
    out["after_invalidate"] = float(store.column("x", [a, b]).copy_to_host()[1])
    out["replaced"] = store.column("x", [a.copy(), b]) is not edited
    order = rng.permutation(1700)
    gathered = store.gather(store.column("x", [a, b]), store.column("o", [order], np.int64))
    out["gather_equal"] = bool(np.array_equal(gathered.copy_to_host(),
                                              np.concatenate([a, b])[order]))
    intensity = rng.gamma(2.0, 100.0, size=1700)
    variance = intensity + rng.uniform(1.0, 10.0, size=1700)
    dataset = np.repeat(np.arange(2, dtype=np.int32), [1000, 700])
    models = [BasicErrorModel(1.3, 0.04), None]
    weights = store.error_model_weights(store.column("I", [intensity]),
                                        store.column("V", [variance]),
                                        store.column("D", [dataset], np.int32), models)
    expected = np.concatenate([models[0].weights(intensity[:1000], variance[:1000]),
                               1.0 / variance[1000:]])
    out["weights_rel"] = float(np.max(np.abs(weights.copy_to_host() - expected) / expected))
    store.begin_call()
    p, q = rng.normal(size=300), rng.normal(size=300)
    dp = store.content("c", p, slots=2)
    dq = store.content("c", q, slots=2)
    out["slots_kept"] = store.content("c", p.copy(), slots=2) is dp and \
        store.content("c", q.copy(), slots=2) is dq
    store.content("c", rng.normal(size=300), slots=2)  # replaces p's slot (the oldest)
    out["oldest_replaced"] = store.content("c", q.copy(), slots=2) is dq
summary = store.summary()["pass"]["calls"]
out["call_bytes"] = [c["observation_bytes"] for c in summary]
out["call_uploads"] = [c["uploaded"] for c in summary]
json.dump(out, open(sys.argv[1], "w"))
"""


def test_job_table_reuse_invalidation_and_device_formulas(tmp_path):
    path = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=SIM,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.load(open(path))
    assert out["same_object"] and out["edit_reuploaded"] and out["edit_value"] == 5.0
    # an edit in place between the samples is not seen: the run replaces its arrays, and
    # invalidate() is the contract for any pass that edits one in place
    assert out["unsampled_edit_missed"] and out["after_invalidate"] == 7.0
    assert out["replaced"] and out["gather_equal"]
    assert out["weights_rel"] <= 1e-15
    assert out["slots_kept"] and out["oldest_replaced"]
    # call 0: x once (1700 x 8 B); call 1: x four times (edit, invalidate, replacement, and
    # back to the original array for the gather), the permutation, I, sigma^2, dataset ids;
    # call 2: two slots and one replacement
    assert out["call_bytes"][0] == 1700 * 8
    assert out["call_uploads"][1].count("x") == 4
    assert out["call_bytes"][1] == 4 * 1700 * 8 + 1700 * 8 + 2 * 1700 * 8 + 1700 * 4
    assert out["call_bytes"][2] == 3 * 300 * 8
