"""One numba cache per installation, chosen by the package (issue 15): a second process
after a first one compiles nothing."""

import json
import os
import subprocess
import sys

from command_line_helpers import quartz_scaled

# Runs dials.vmerge.merge, then counts numba's cache hits and misses (a miss is a compile)
# over every kernel the run used.
PROBE = """
import json, sys
import dials_vmerge
from dials_vmerge.command_line.merge import main
code = main(sys.argv[1:])
from numba.core.dispatcher import Dispatcher
hits = misses = 0
for name, module in list(sys.modules.items()):
    if name.startswith("dials_vmerge"):
        for obj in vars(module).values():
            # a size-dispatched kernel (kernels/size_dispatch.py) holds two dispatchers
            for dispatcher in ([obj] if isinstance(obj, Dispatcher)
                               else getattr(obj, "dispatchers", [])):
                if isinstance(dispatcher, Dispatcher):
                    hits += sum(dispatcher.stats.cache_hits.values())
                    misses += sum(dispatcher.stats.cache_misses.values())
print(json.dumps({"code": code, "hits": hits, "misses": misses}))
"""


def _environment(**changes):
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    env.update(changes)
    return env


def test_package_chooses_the_cache_directory(tmp_path):
    code = "import sys, dials_vmerge, numba; print(numba.config.CACHE_DIR); print(sys.prefix)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_environment(), cwd=tmp_path, check=True).stdout.split("\n")
    if os.access(out[1], os.W_OK):
        assert out[0] == os.path.join(out[1], "numba_cache")  # the Makefile's .venv/numba_cache
    else:
        assert out[0].endswith(os.path.join("dials-vmerge", "numba"))
    # an explicit NUMBA_CACHE_DIR wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_environment(NUMBA_CACHE_DIR=str(tmp_path / "mine")),
                         cwd=tmp_path, check=True).stdout.split("\n")
    assert out[0] == str(tmp_path / "mine")


def test_second_process_compiles_nothing(tmp_path):
    expt, refl = quartz_scaled()
    env = _environment(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", PROBE, expt, refl, "merged_mtz=None"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0]["code"] == runs[1]["code"] == 0
    assert runs[0]["misses"] > 0  # a cold cache: the first process compiled
    assert runs[1]["misses"] == 0 and runs[1]["hits"] > 0


# Calls the kernels whose helpers were once compiled twice per process: a helper called with a
# variable that starts as the constant 0 (`u = 0`, later `u += 1`) is typed first with
# Literal[int](0), then with int64, and numba compiles both (~0.15 s of each cold start).
HELPER_SIGNATURES = """
import json
import numpy as np
import dials_vmerge
from dials_vmerge.merging.statistics import _draw_first_half, half_split_kernel
from dials_vmerge.model.smoother import smoother_weights_1d
from dials_vmerge.kernels.smoother_weights import normalise_row
from dials_vmerge.scaling.outliers import _sift_down, capped_weights_kernel

rng = np.random.default_rng(0)
group_start = np.array([0, 40, 43, 90], np.int64)
weights = rng.random(90)
capped = np.empty(90)
capped_weights_kernel(weights, group_start, np.array([0, 3], np.int64), capped)
smoother_weights_1d(np.linspace(0.0, 9.0, 50), 6)
order = np.arange(3, dtype=np.int64)
half_split_kernel(rng.random(90), np.ones(90), np.arange(90, dtype=np.int64), group_start,
                  order, rng.random(200), True)
print(json.dumps({f.__name__: [str(s) for s in f.signatures]
                  for f in (_sift_down, normalise_row, _draw_first_half)}))
"""


def test_helpers_compile_once(tmp_path):
    """A cold process compiles each helper for one signature: no Literal[int](0) twin."""
    result = subprocess.run([sys.executable, "-c", HELPER_SIGNATURES], capture_output=True,
                            text=True, env=_environment(NUMBA_CACHE_DIR=str(tmp_path)),
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    signatures = json.loads(result.stdout.strip().splitlines()[-1])
    for name, compiled in signatures.items():
        assert len(compiled) == 1 and "Literal" not in compiled[0], (name, compiled)
