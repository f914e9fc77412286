"""scaled.refl written by a background thread while merging runs (issue 10, 1e6 sweep speed):
the thread's result and errors reach the caller, a failure on either side leaves no output
files, and the written scaled.refl is the file an in-line write gives."""

import os
import shutil
import sys
import threading

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba and cctbx users)
from dials_vmerge.background import SWITCH_INTERVAL_S, BackgroundTask
from dials_vmerge.io import read_reflections

from quartz_helpers import QUARTZ


def test_background_task_returns_the_value_and_restores_the_switch_interval():
    before = sys.getswitchinterval()
    started = threading.Event()

    def work(a, b=0):
        started.set()
        return a + b

    task = BackgroundTask(work, 2, b=3)
    assert started.wait(10)
    assert task.result() == 5
    assert sys.getswitchinterval() == before
    assert SWITCH_INTERVAL_S < before  # the default 5 ms: the task shortens it while it runs


def test_background_task_raises_its_error_in_the_caller_once():
    def fail():
        raise OSError(28, "No space left on device")

    task = BackgroundTask(fail)
    task.wait()  # joins without raising
    with pytest.raises(OSError, match="No space left"):
        task.result()
    assert task.result() is None  # handed over once


def _run_vmerge(tmp_path, monkeypatch, *extra):
    from dials_vmerge.command_line.vmerge import main

    for name in ("integrated.expt", "integrated.refl"):
        shutil.copy(os.path.join(QUARTZ, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return main(["integrated.expt", "integrated.refl", "output.html=None", *extra])


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_writer_error_fails_the_run_with_one_line_and_no_outputs(tmp_path, monkeypatch,
                                                                 capsys):
    import dials_vmerge.io as io

    def broken_write(table, path):
        with open(path, "wb") as f:  # a partial file, as a full disk leaves it
            f.write(b"\x93")
        from dials_vmerge.errors import VmergeError

        raise VmergeError(f"{path}: cannot write file (No space left on device)")

    monkeypatch.setattr(io, "write_reflections", broken_write)
    code = _run_vmerge(tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert _files(tmp_path) == ["integrated.expt", "integrated.refl"]


def test_merging_error_waits_for_the_writer_and_leaves_no_outputs(tmp_path, monkeypatch,
                                                                  capsys):
    import dials_vmerge.command_line.vmerge as vmerge
    import dials_vmerge.io as io

    written = threading.Event()
    real_write = io.write_reflections

    def slow_write(table, path):
        real_write(table, path)
        written.set()

    def failing_merge(*args, **kwargs):
        from dials_vmerge.errors import VmergeError

        raise VmergeError("merging failed on purpose")

    monkeypatch.setattr(io, "write_reflections", slow_write)
    monkeypatch.setattr(vmerge, "merge_scaled_table", failing_merge)
    code = _run_vmerge(tmp_path, monkeypatch)
    assert code == 1
    assert "merging failed on purpose" in capsys.readouterr().err
    assert written.is_set()  # the run ended after the writer, whose file was then removed
    assert _files(tmp_path) == ["integrated.expt", "integrated.refl"]


def test_background_write_equals_the_in_line_write(tmp_path, monkeypatch):
    """The run's scaled.refl, byte for byte, against the same scaled table written in line
    by write_reflections (caught as the background task was handed it); merging that table
    and merging the written file give the same result."""
    import dials_vmerge.pipeline as pipeline
    from dials_vmerge.io import write_reflections

    tables = []
    real_start = pipeline.start_writing_scaled_files

    def keep_table(params, experiments, table, staged):
        tables.append(table)
        return real_start(params, experiments, table, staged)

    import dials_vmerge.command_line.vmerge as vmerge

    monkeypatch.setattr(vmerge, "start_writing_scaled_files", keep_table)
    assert _run_vmerge(tmp_path, monkeypatch) == 0
    write_reflections(tables[0], str(tmp_path / "in_line.refl"))
    assert (tmp_path / "scaled.refl").read_bytes() == (tmp_path / "in_line.refl").read_bytes()

    # merging reads the scaled table, not the written file: the two give the same merge
    from dials_vmerge.cli import Program
    from dials_vmerge.io import read_experiments
    from dials_vmerge.merging.api import merge_scaled_table

    experiments = read_experiments(str(tmp_path / "scaled.expt"))
    _, _, params = Program(name="dials.vmerge", phil_files=vmerge.PHIL_FILES,
                           run=None).extract(["output.html=None"], [])
    from_table = merge_scaled_table(tables[0], experiments, params)
    from_file = merge_scaled_table(read_reflections(str(tmp_path / "scaled.refl")),
                                   experiments, params)
    for name in ("merged", "merged_anomalous"):
        a, b = getattr(from_table, name), getattr(from_file, name)
        np.testing.assert_array_equal(a.asu_index, b.asu_index)
        np.testing.assert_array_equal(a.intensity, b.intensity)
        np.testing.assert_array_equal(a.sigma, b.sigma)
    assert from_table.as_json() == from_file.as_json()
