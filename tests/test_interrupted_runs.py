"""Killing dials.vmerge while it writes never damages inputs or leaves half-written outputs,
even when the outputs overwrite the inputs; reruns on our own output give the same result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DATA
from dials_vmerge.io import read_experiments, read_reflections

QUARTZ = os.path.join(DATA, "quartz_processed")
CODE = "import sys; from dials_vmerge.command_line.vmerge import main; sys.exit(main())"


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-c", CODE, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check_outputs_complete(directory):
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("."):
            continue  # temp files of an interrupted atomic write (never under the final name)
        if name.endswith(".refl"):
            read_reflections(path)
        elif name.endswith(".expt"):
            read_experiments(path)
        elif name.endswith(".json"):
            json.load(open(path))
        elif name.endswith(".mtz"):
            import gemmi

            gemmi.read_mtz_file(path)


@pytest.fixture
def full_run_seconds(tmp_path_factory):
    work = tmp_path_factory.mktemp("timing")
    shutil.copy(os.path.join(QUARTZ, "scaled.expt"), work / "scaled.expt")
    shutil.copy(os.path.join(QUARTZ, "scaled.refl"), work / "scaled.refl")
    start = time.time()
    p = _start(["scaled.expt", "scaled.refl"], work)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()
    return time.time() - start, work


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_kill_while_overwriting_inputs(full_run_seconds, tmp_path, sig):
    seconds, _ = full_run_seconds
    rng = np.random.default_rng(2026 + int(sig))
    originals = {n: open(os.path.join(QUARTZ, n.replace("scaled", "scaled")), "rb").read() for n in ("scaled.expt", "scaled.refl")}
    # Kill at spread-out moments across the run, weighted towards the end where files are written.
    for n, fraction in enumerate(np.sort(rng.uniform(0.3, 1.05, size=4))):
        work = tmp_path / f"run{n}"
        work.mkdir()
        for name, data in originals.items():
            (work / name).write_bytes(data)
        p = _start(["scaled.expt", "scaled.refl"], work)
        time.sleep(seconds * fraction)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        assert b"Traceback" not in err
        _check_outputs_complete(work)
        # The inputs are either untouched or completely replaced by a valid new version.
        for name in originals:
            assert (work / name).exists()


def test_rerun_on_own_output_is_repeatable_and_deterministic(full_run_seconds, tmp_path):
    _, first = full_run_seconds
    results = []
    for copy in ("a", "b"):
        work = tmp_path / copy
        work.mkdir()
        for name in ("scaled.expt", "scaled.refl"):
            shutil.copy(first / name, work / name)
        for _ in range(2):  # rerun on our own output, twice in a row
            p = _start(["scaled.expt", "scaled.refl"], work)
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err.decode()
        results.append(read_reflections(str(work / "scaled.refl")))
    # The same options on the same input give the same numbers.
    np.testing.assert_allclose(results[0]["inverse_scale_factor"], results[1]["inverse_scale_factor"], rtol=1e-10)
    np.testing.assert_array_equal(results[0]["flags"], results[1]["flags"])


def test_interrupt_while_modules_load_is_one_line(tmp_path):
    # Ctrl-C between the programs' package and the program's own imports (where a loaded
    # machine spends seconds): one line, exit 130, no traceback, nothing written
    code = ("import os, signal, dials_vmerge.command_line; os.kill(os.getpid(), signal.SIGINT); "
            "import dials_vmerge.command_line.vmerge; print('not interrupted')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert run.returncode == 130
    assert run.stdout == b""
    assert run.stderr == b"dials.vmerge: interrupted while starting; no output files were changed\n"
    assert os.listdir(tmp_path) == []


def test_program_puts_the_interrupt_handler_back(tmp_path):
    # once main runs, a Ctrl-C is a KeyboardInterrupt again (reported by Program.main)
    code = ("import signal, sys, dials_vmerge.command_line as programs; "
            "from dials_vmerge.command_line.vmerge import main; "
            "assert signal.getsignal(signal.SIGINT) is programs._interrupted_while_starting; "
            "main(['--help']); "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.decode().endswith("ok\n")
