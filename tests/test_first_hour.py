"""What a new user meets in the first hour (issue 15): plain-word errors, the version line,
model=auto, the simulator's shorthands, a Ctrl-C inside a C callback."""

import ctypes
import os
import time

import pytest

from command_line_helpers import quartz_scaled


def test_number_and_choice_errors_in_plain_words(tmp_path, monkeypatch, capsys):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    expt, refl = quartz_scaled()
    assert main([expt, refl, "nproc=abc"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "dials.vmerge.merge: error: compute.nproc=abc: not a number"
    assert main([expt, refl, "merging.method=foo"]) == 1
    err = capsys.readouterr().err
    assert "choices: classical, robust, variational, all" in err and "*" not in err
    assert os.listdir(tmp_path) == []


def test_model_auto_is_a_choice_and_not_a_change(capsys):
    from dials_vmerge.cli import Program

    program = Program("dials.vmerge", ["input", "model", "scaling", "merging", "compute",
                                       "output"], run=None)
    from dials_vmerge.model.base import is_auto

    master, working, params = program.extract(["model=auto"], [])
    assert is_auto(params.model)
    assert "model" not in master.fetch_diff(working).as_str()
    assert program.main(["-h"]) == 0
    assert "model = *auto physical array KB" in capsys.readouterr().out


def test_version_equals_the_log_header(tmp_path, monkeypatch, capsys):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    assert main(["--version"]) == 0
    version = capsys.readouterr().out.strip()
    assert main(list(quartz_scaled()) + ["merged_mtz=None"]) == 0
    with open("dials.vmerge.merge.log") as f:
        assert f.readline().strip() == version == "dials.vmerge.merge (dials-vmerge 0.1.0)"


def test_simulate_shorthands_and_stills_imply_kb(tmp_path, monkeypatch):
    from dials_vmerge.command_line.simulate import main
    from dials_vmerge.io import read_experiments
    from dials_vmerge.simulate import read_truth

    monkeypatch.chdir(tmp_path)
    assert main(["n_images=12", "n_sweeps=1", "output.prefix=sim", "d_min=3"]) == 0
    experiments = read_experiments("sim.expt")
    assert experiments[0].scan["image_range"] == [1, 12]
    assert os.path.exists("sim.refl") and os.path.exists("sim_truth.h5")
    # stills without model=: the KB truth; n_images= counts the stills
    assert main(["mode=stills", "n_images=7", "output.prefix=st", "d_min=3"]) == 0
    assert len(read_experiments("st.expt")) == 7
    assert read_truth("st_truth.h5")["model"] == "KB"
    assert main(["mode=stills", "model=physical", "output.prefix=bad", "d_min=3"]) == 1


def test_interrupt_inside_a_c_callback_reaches_the_program(capsys):
    """Python "ignores" a KeyboardInterrupt raised in a ctypes callback (numba's object
    cache runs one while kernels load) and prints a traceback; the CLI re-delivers it."""
    from dials_vmerge.cli import _deliver_interrupts_from_callbacks

    _deliver_interrupts_from_callbacks()

    def callback():
        raise KeyboardInterrupt

    c_callback = ctypes.CFUNCTYPE(None)(callback)
    with pytest.raises(KeyboardInterrupt):
        c_callback()
        time.sleep(5)  # the interrupt arrives here, after the callback returned
    assert "Traceback" not in capsys.readouterr().err
