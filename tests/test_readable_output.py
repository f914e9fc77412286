"""Readable output at any dataset count: the many-dataset summary, the collapsed batch
table, the log written as the run goes, and the progress marks."""

import glob
import io
import logging
import os

import numpy as np
import pytest

from dials_vmerge.batches import format_batch_table
from dials_vmerge.cli import Program
from dials_vmerge.errors import VmergeError
from dials_vmerge.pipeline import format_scaling_summary
from dials_vmerge.progress import run_progress, stage, steps


class _Experiment:
    def __init__(self, identifier):
        self.identifier = identifier


class _Model:
    def __init__(self, scale, b):
        self.scale, self.b = scale, b

    def to_dict(self):
        return {"__id__": "KB", "scale": {"parameters": [self.scale]},
                "decay": {"parameters": [self.b]}}

    def __str__(self):
        return f"KB model scale {self.scale}"


def test_many_datasets_summary_gives_spreads_not_one_block_per_dataset():
    rng = np.random.default_rng(3)
    n = 500
    experiments = [_Experiment(f"still-{i:04d}") for i in range(n)]
    scales = rng.uniform(0.5, 2.0, n)
    bs = rng.normal(0.0, 3.0, n)
    outliers = rng.integers(0, 20, n)
    models = [_Model(s, b) for s, b in zip(scales, bs)]
    summary = {"datasets": [{"n_suitable": 300, "n_selected": 250, "n_outliers": int(o),
                             "error_model": (1.1, 0.02)} for o in outliers],
               "dropped_datasets": ["still-9998", "still-9999"]}
    text = format_scaling_summary(experiments, models, summary)
    lines = text.strip().splitlines()
    assert len(lines) < 12, text
    assert "KB model scale" not in text  # no per-dataset model block
    scale_line = next(l for l in lines if "mean scale parameter" in l)
    lo, hi = int(np.argmin(scales)), int(np.argmax(scales))
    assert f"min {scales[lo]:.4g} (still-{lo:04d})" in scale_line
    assert f"median {np.median(scales):.4g}" in scale_line
    assert f"max {scales[hi]:.4g} (still-{hi:04d})" in scale_line
    b_line = next(l for l in lines if "mean B" in l)
    assert f"median {np.median(bs):.4g}" in b_line and f"min {bs.min():.4g}" in b_line
    outlier_line = next(l for l in lines if l.strip().startswith("outliers"))
    assert f"total {outliers.sum()}" in outlier_line and f"max {outliers.max()}" in outlier_line
    assert "error model: a = 1.10000, b = 0.02000 (all datasets)" in text
    assert "2 dataset(s) removed during scaling (no usable reflections): still-9998, still-9999" \
        in text


def test_few_datasets_keep_one_block_each():
    experiments = [_Experiment(f"sweep-{i}") for i in range(3)]
    models = [_Model(1.0 + i, 0.0) for i in range(3)]
    text = format_scaling_summary(experiments, models, {"datasets": [{}, {}, {}]})
    assert text.count("KB model scale") == 3


def test_batch_table_collapses_runs_of_single_image_datasets():
    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.simulate import simulate_stills

    experiments_dict, _, _ = simulate_stills(n_stills=60, n_obs_target=3000, seed=1)
    experiments = ExperimentList.from_dict(experiments_dict)
    lines = format_batch_table(experiments).splitlines()
    assert len(lines) == 3, lines  # header, rule, one row for the 60 stills
    row = lines[2]
    assert row.startswith("60 single-image datasets: " + experiments[0].identifier + " ... "
                          + experiments[59].identifier)


def _program(run):
    return Program("dials.vmerge.test", ["input", "output"], run, needs_data=False)


def test_log_is_written_as_the_run_goes(tmp_path, monkeypatch):
    import tempfile

    # the streamed log lives in the system's temporary directory until the run succeeds
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = {}

    def run(params, inputs, log):
        log.info("first stage done")
        running = glob.glob(str(scratch / ".dials.vmerge.test.log.*"))
        assert len(running) == 1
        seen["during"] = open(running[0]).read()
        assert not os.path.exists("dials.vmerge.test.log")
        assert os.listdir(work) == []  # nothing beside the outputs while the run goes

    assert _program(run).main([]) == 0
    assert "Command line: dials.vmerge.test" in seen["during"]
    assert "first stage done" in seen["during"]
    final = open("dials.vmerge.test.log").read()
    assert final.startswith(seen["during"]) and "Total time" in final
    assert os.listdir(work) == ["dials.vmerge.test.log"]
    assert os.listdir(scratch) == []


def test_failed_run_leaves_no_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(params, inputs, log):
        log.info("about to fail")
        raise VmergeError("bad data")

    assert _program(run).main([]) == 1
    assert os.listdir(tmp_path) == []


def test_progress_bar_and_log_lines_for_stages():
    log = logging.getLogger("test_readable_output.progress")
    log.handlers.clear()
    record = io.StringIO()
    log.addHandler(logging.StreamHandler(record))
    log.setLevel(logging.INFO)
    log.propagate = False
    bar_output = io.StringIO()
    with run_progress(log, 2, enabled=True, file=bar_output) as bar:
        with stage(log, "Merging", min_seconds=0.0):
            pass
        with stage(log, "Quick stage"):  # under 2 s: no log line
            pass
        assert bar.n == 2
    assert "Merging" in bar_output.getvalue() and "stages" in bar_output.getvalue()
    assert "Merging: " in record.getvalue() and "Quick stage" not in record.getvalue()
    assert list(steps(log, "Rounds", range(3), min_seconds=0.0, enabled=False)) == [0, 1, 2]
    assert "Rounds: 3 in" in record.getvalue()
    # without an open bar (library use, not a terminal) a stage still logs its time
    with stage(log, "Library stage", min_seconds=0.0):
        pass
    assert "Library stage: " in record.getvalue()


def test_per_dataset_values_line_is_a_list_up_to_20_datasets_then_a_summary():
    from dials_vmerge.dataset_summary import format_per_dataset_values

    assert format_per_dataset_values("Outlier rejection", [3, 0, 5]) == \
        "Outlier rejection: 3, 0, 5"
    counts = list(range(100))
    line = format_per_dataset_values("Outlier rejection", counts)
    assert line == ("Outlier rejection: 100 datasets, total 4950, per dataset min 0, "
                    "median 49.5, max 99")
