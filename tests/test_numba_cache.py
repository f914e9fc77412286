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
