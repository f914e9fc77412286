"""The shared command line: PHIL handling, flags, and one-line errors with exit code 1."""

import os
import subprocess
import sys

import pytest

from dials_vmerge.cli import Program


def _program(run=None, **kw):
    calls = []

    def record(params, inputs, log):
        calls.append(params)

    p = Program("dials.vmerge.test", ["input", "model", "scaling", "compute", "output"], run or record, needs_data=False, **kw)
    return p, calls


def test_unique_suffix_and_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p, calls = _program()
    assert p.main(["nproc=3", "absorption_level=medium", "exclude_batches=1,10", "exclude_batches=20,30", "decay_term=False", "d_min=1.5"]) == 0
    params = calls[0]
    assert params.compute.nproc == 3
    assert params.physical.absorption_level == "medium"
    assert params.exclude_batches == [[1, 10], [20, 30]]
    assert params.physical.decay_correction is False
    assert params.array.decay_correction is False and params.KB.decay_correction is False
    assert params.cut_data.d_min == 1.5
    assert (tmp_path / "dials.vmerge.test.log").exists()


def test_phil_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.phil").write_text("physical { lmax = 6 }\ncut_data.partiality_cutoff = 0.4\n")
    p, calls = _program()
    assert p.main(["my.phil"]) == 0
    assert calls[0].physical.lmax == 6 and calls[0].cut_data.partiality_cutoff == 0.4


@pytest.mark.parametrize(
    "arg, words",
    [
        ("foo=1", "Unknown"),
        ("decay_interval=3", "Ambiguous"),
        ("nproc=abc", "compute.nproc"),
        ("partiality_cutoff=2", "maximum"),
        ("model=foo", "Not a possible choice"),
        ("lmax=1", "minimum"),
        ("missing.refl", "missing.refl"),
        ("-x", "unknown option"),
    ],
)
def test_bad_parameters_are_one_line(tmp_path, monkeypatch, capsys, arg, words):
    monkeypatch.chdir(tmp_path)
    p, calls = _program()
    assert p.main([arg]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not calls and os.listdir(tmp_path) == []


def test_show_config_and_version(capsys):
    p, calls = _program()
    assert p.main(["-c", "d_min=1.5"]) == 0
    out = capsys.readouterr().out
    assert "d_min = 1.5" in out and "lmax" not in out and not calls
    assert p.main(["-c", "-e", "2"]) == 0
    assert "fix_initial" in capsys.readouterr().out
    assert p.main(["--version"]) == 0
    assert "0.1.0" in capsys.readouterr().out


def test_internal_error_is_one_line_unless_debug(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def boom(params, inputs, log):
        raise ZeroDivisionError("oops")

    p, _ = _program(run=boom)
    assert p.main([]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: oops" in err and err.count("\n") == 1
    with pytest.raises(ZeroDivisionError):
        p.main(["--debug"])


def test_show_program_on_quartz(quartz_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from dials_vmerge.command_line.show import main; sys.exit(main())",
         os.path.join(quartz_dir, "scaled.expt"), os.path.join(quartz_dir, "scaled.refl")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "image range: 1-100   batch range: 1-100" in out.stdout
    assert "P 31 2 1" in out.stdout
    assert "scaled 1401" in out.stdout and "outlier_in_scaling 111" in out.stdout
    assert "absorption (24 parameters)" in out.stdout
    assert os.listdir(tmp_path) == []


def test_devices_program(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from dials_vmerge.command_line.devices import main; sys.exit(main())"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f"CPU cores:            {os.cpu_count()}" in out.stdout
    assert "workqueue" in out.stdout and "CUDA" in out.stdout and "MPI" in out.stdout


def test_show_missing_file_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from dials_vmerge.command_line.show import main; sys.exit(main())",
         "nothere.expt", "nothere.refl"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "dials.vmerge.show: error: nothere.expt: file not found"
