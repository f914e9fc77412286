"""dials.vmerge.merge and dials.vmerge.stats on the DIALS quartz scaled pair."""

import json
import os

import numpy as np
import pytest

from command_line_helpers import quartz_scaled

gemmi = pytest.importorskip("gemmi")


@pytest.mark.parametrize("method", ["classical", "robust", "variational"])
def test_merge_program_writes_mtz_log_json(tmp_path, monkeypatch, method):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    expt, refl = quartz_scaled()
    assert main([expt, refl, f"merging.method={method}", "unmerged_mtz=unmerged.mtz"]) == 0
    mtz = gemmi.read_mtz_file("merged.mtz")
    labels = [c.label for c in mtz.columns]
    assert labels[:7] == ["H", "K", "L", "FreeR_flag", "IMEAN", "SIGIMEAN", "N"]
    assert {"F", "SIGF", "I(+)", "I(-)", "F(+)", "DANO", "SIGDANO"} <= set(labels)
    assert mtz.spacegroup.hm == "P 31 2 1"
    data = np.array(mtz)
    f = data[:, labels.index("F")]
    if method == "variational":
        assert np.all(np.isfinite(f)) and np.all(f > 0)
    assert mtz.nreflections == 298
    report = json.load(open("dials.vmerge.merge.json"))
    assert report["method"] == method and report["n_unique"] == 298
    assert report["merging_statistics"]["overall"]["n_obs"] == 1401
    log = open("dials.vmerge.merge.log").read()
    assert "Summary of merging statistics" in log and "cc1/2" in log
    unmerged = gemmi.read_mtz_file("unmerged.mtz")
    assert [c.label for c in unmerged.columns][:9] == [
        "H", "K", "L", "M/ISYM", "BATCH", "I", "SIGI", "SCALEUSED", "SIGSCALEUSED"]
    # rows: the 1401 merged observations less the partials summed into their first part
    assert 1300 < unmerged.nreflections <= 1401
    batch = np.array(unmerged.column_with_label("BATCH"))
    assert batch.min() >= 1 and batch.max() <= 100  # quartz: one sweep of 100 images


def test_merge_program_rejects_several_methods(tmp_path, monkeypatch, capsys):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    expt, refl = quartz_scaled()
    assert main([expt, refl, "merging.method=all"]) == 1
    assert "merging.method" in capsys.readouterr().err
    assert not os.path.exists("merged.mtz")


def test_merge_program_rejects_unscaled_input(tmp_path, monkeypatch, capsys):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    here = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")
    assert main([os.path.join(here, "integrated.expt"), os.path.join(here, "integrated.refl")]) == 1
    assert "not scaled" in capsys.readouterr().err


def test_stats_program_all_methods(tmp_path, monkeypatch):
    from dials_vmerge.command_line.stats import main

    monkeypatch.chdir(tmp_path)
    expt, refl = quartz_scaled()
    assert main([expt, refl, "merging.method=all", "half_dataset_repeats=3", "nbins=5"]) == 0
    report = json.load(open("dials.vmerge.stats.json"))
    assert set(report["half_dataset"]) == {"classical", "robust", "variational"}
    for method, result in report["half_dataset"].items():
        assert result["repeats"] == 3 and len(result["cc_half"]["shells"]) == 5
        assert result["cc_half"]["overall"]["pearson_mean"] > 0.9
    log = open("dials.vmerge.stats.log").read()
    assert "Half-dataset cross-validation" in log and "variational" in log


def test_merge_program_excludes_batches(tmp_path, monkeypatch):
    from dials_vmerge.command_line.merge import main

    monkeypatch.chdir(tmp_path)
    expt, refl = quartz_scaled()
    assert main([expt, refl, "exclude_batches=51,100", "unmerged_mtz=unmerged.mtz"]) == 0
    batch = np.array(gemmi.read_mtz_file("unmerged.mtz").column_with_label("BATCH"))
    assert batch.max() <= 50 and batch.min() >= 1
    report = json.load(open("dials.vmerge.merge.json"))
    assert report["merging_statistics"]["overall"]["n_obs"] < 1000
