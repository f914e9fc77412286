"""Every example command of the README and of every program's -h runs as written
(issue 15: the first hour of a new user), on the quartz example data.

The commands are read from the README's Examples block and from the "Examples:" part of
each program's help, and run in that order with the installed console scripts in one
directory holding integrated.expt/.refl (the quartz sweep) and sweep1/sweep2 (two copies
with their own identifiers); the scaled.* and MTZ files they name are the ones earlier
examples wrote, as for a user who types them one after another.
"""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from quartz_helpers import QUARTZ, two_quartz_sweep_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PROGRAMS = ["vmerge", "merge", "stats", "simulate", "show", "devices"]


def readme_examples():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().split("## Examples", 1)[1].split("\n## ", 1)[0].splitlines()
    return [l.strip() for l in lines if l.startswith("    dials.vmerge")]


def help_examples(module):
    import importlib

    text = importlib.import_module(f"dials_vmerge.command_line.{module}").HELP
    if "Examples:" not in text:
        return []
    return [l.strip() for l in text.split("Examples:", 1)[1].splitlines()
            if l.strip().startswith("dials.vmerge")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("examples")
    for name in ("integrated.expt", "integrated.refl"):
        shutil.copy(os.path.join(QUARTZ, name), work / name)
    expts, refls = two_quartz_sweep_paths(tmp_path_factory.mktemp("sweeps"))
    for n, (expt, refl) in enumerate(zip(expts, refls), 1):
        shutil.copy(expt, work / f"sweep{n}.expt")
        shutil.copy(refl, work / f"sweep{n}.refl")
    return work


def run_example(command, cwd):
    words = shlex.split(command)
    program = os.path.join(BIN, words[0])
    assert os.path.exists(program), f"{words[0]} is not installed in {BIN}"
    result = subprocess.run([program] + words[1:], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower(), command
    return result


def test_there_are_examples_everywhere():
    assert len(readme_examples()) >= 8
    for module in PROGRAMS:
        if module != "devices":  # takes no input: its help is its one command line
            assert help_examples(module), module


def test_readme_examples_run_as_written(workdir):
    for command in readme_examples():
        run_example(command, workdir)
    assert (workdir / "sim.expt").exists() and (workdir / "unmerged.mtz").exists()


@pytest.mark.slow  # about 60 s on 2 cores: 16 program runs (make test-all runs it)
def test_help_examples_run_as_written(workdir):
    if not (workdir / "scaled.expt").exists():  # run alone: make the files README makes
        run_example("dials.vmerge integrated.expt integrated.refl "
                    "output.unmerged_mtz=unmerged.mtz", workdir)
    already_run = set(readme_examples())  # the same command twice proves nothing new
    for module in PROGRAMS:
        for command in help_examples(module):
            if command not in already_run:
                run_example(command, workdir)


def test_help_piped_into_head_is_quiet(tmp_path):
    """`dials.vmerge -h | head` ends quietly: no BrokenPipeError, exit code 0."""
    for program in ("dials.vmerge", "dials.vmerge.merge", "dials.vmerge.show"):
        pipeline = f"{shlex.quote(os.path.join(BIN, program))} -h | head -1"
        result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        assert result.stdout.startswith(program)
