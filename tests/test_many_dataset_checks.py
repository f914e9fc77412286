"""Many-dataset rules: reflection_selection.method=auto by size, unit-cell consistency."""

import pytest

from dials_vmerge.scaling.selection import resolve_method


@pytest.mark.parametrize("n_suitable, n_datasets, stills, expected", [
    (19_999, 1, False, "use_all"),
    (20_000, 1, False, "quasi_random"),
    (39_999, 1, False, "quasi_random"),
    (39_999, 2, False, "use_all"),
    (39_999, 500, True, "use_all"),
    (40_000, 2, False, "quasi_random"),
    (40_000, 500, True, "intensity_ranges"),
    (None, 3, True, "intensity_ranges"),
])
def test_auto_selection_uses_every_reflection_below_the_size_rule(n_suitable, n_datasets,
                                                                   stills, expected):
    assert resolve_method("auto", stills, n_suitable, n_datasets) == expected
    assert resolve_method(None, stills, n_suitable, n_datasets) == expected


@pytest.mark.parametrize("method", ["quasi_random", "random", "use_all", "intensity_ranges"])
def test_explicit_selection_method_is_kept(method):
    assert resolve_method(method, False, 10, 2) == method


def _two_sweeps_with_cell_scaled(tmp_path, factor):
    """The quartz pair twice (quartz_helpers.two_quartz_sweep_paths), the second crystal's
    real-space vectors multiplied by `factor` (every cell length changes by that factor)."""
    import json

    from quartz_helpers import two_quartz_sweep_paths

    expts, refls = two_quartz_sweep_paths(tmp_path)
    d = json.load(open(expts[1]))
    crystal = d["crystal"][0]
    for axis in ("real_space_a", "real_space_b", "real_space_c"):
        crystal[axis] = [factor * x for x in crystal[axis]]
    crystal.pop("A_at_scan_points", None)
    crystal.pop("B_covariance", None)
    with open(expts[1], "w") as f:
        json.dump(d, f)
    return [expts[0], refls[0], expts[1], refls[1]]


def _main(program, args, directory, monkeypatch):
    import importlib

    monkeypatch.chdir(directory)
    return importlib.import_module(f"dials_vmerge.command_line.{program}").main(args)


@pytest.mark.parametrize("program", ["vmerge", "merge"])
def test_cells_differing_by_more_than_ten_percent_stop_the_run(tmp_path, monkeypatch, capsys,
                                                                program):
    import os

    if program == "merge":  # scaled input
        args = _two_scaled_with_cell_scaled(tmp_path, 1.3)
    else:
        args = _two_sweeps_with_cell_scaled(tmp_path, 1.3)
    before = set(os.listdir(tmp_path))
    assert _main(program, args, tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "unit cells differ from the median cell" in err[0]
    assert "more than 10%" in err[0] and "second-sweep" in err[0]
    assert "allow_inconsistent_cells=True" in err[0]
    assert "Traceback" not in err[0]
    assert set(os.listdir(tmp_path)) == before  # no output files


def _two_scaled_with_cell_scaled(tmp_path, factor):
    """DIALS's scaled quartz pair and a copy of it renamed "second-sweep" (its table also
    uses id 0), the copy's cell lengths multiplied by `factor`."""
    import json

    from command_line_helpers import quartz_scaled
    from dials_vmerge.io import read_reflections, write_reflections

    expt, refl = quartz_scaled()
    d = json.load(open(expt))
    d["experiment"][0]["identifier"] = "second-sweep"
    crystal = d["crystal"][0]
    for axis in ("real_space_a", "real_space_b", "real_space_c"):
        crystal[axis] = [factor * x for x in crystal[axis]]
    crystal.pop("A_at_scan_points", None)
    crystal.pop("B_covariance", None)
    table = read_reflections(refl)
    table.identifiers = {0: "second-sweep"}
    write_reflections(table, str(tmp_path / "second.refl"))
    (tmp_path / "second.expt").write_text(json.dumps(d))
    return [expt, refl, str(tmp_path / "second.expt"), str(tmp_path / "second.refl")]


def test_cells_differing_by_a_few_percent_warn_and_merge(tmp_path, monkeypatch, capsys):
    args = _two_sweeps_with_cell_scaled(tmp_path, 1.03)
    assert _main("vmerge", args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    warning = [l for l in out.splitlines() if "unit cells of" in l]
    assert len(warning) == 1, warning
    # With two datasets the median is their mean: each differs from it by 1.5%.
    assert "2 dataset(s) differ from the median cell" in warning[0]
    assert "0 (001f4105" in warning[0] and "1 (second-sweep)" in warning[0]
    assert "more than 1%" in warning[0] and "(largest 1.5%)" in warning[0]
    assert (tmp_path / "merged.mtz").exists()
    log = (tmp_path / "dials.vmerge.log").read_text()
    assert warning[0] in log


def test_allow_inconsistent_cells_merges_with_a_warning(tmp_path, monkeypatch, capsys):
    args = _two_scaled_with_cell_scaled(tmp_path, 1.3)
    assert _main("merge", args + ["allow_inconsistent_cells=True"], tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "differ from the median cell" in out and "(largest 13.0%)" in out  # 1.3 / 1.15 - 1
    assert (tmp_path / "merged.mtz").exists()
