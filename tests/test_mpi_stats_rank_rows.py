"""`mpiexec -n 2|3 dials.vmerge.stats scaled.expt scaled.refl` merges, takes the statistics and
the half-dataset cross-validation on each rank's own rows and writes the one-process JSON and
log (issue 11; merging/rank_merge.py, merging/rank_halfdataset.py), classical and robust.

Real launcher runs (the `mpi` extra's mpich) on a small 3-sweep simulation scaled by
dials.vmerge (~21 000 rows: every rank holds rows), and a script run under the launcher that
compares rank_halfdataset.rank_half_dataset_statistics on synthetic rows split into ranges of
non-anomalous ASU keys with the one-process halfdataset.half_dataset_statistics.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge.io import read_reflections

import mpi_helpers
from mpi_helpers import comparable_log, launcher, rows_per_rank

pytest.importorskip("mpi4py")

TIMEOUT_S = 180
OUTPUTS = ["dials.vmerge.stats.html", "dials.vmerge.stats.json", "dials.vmerge.stats.log"]


def run(args, cwd, n_ranks=None):
    return mpi_helpers.run(args, cwd, n_ranks, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """(scaled.expt, scaled.refl) of 3 simulated sweeps scaled by dials.vmerge."""
    d = tmp_path_factory.mktemp("sweeps3")
    done = run(["dials.vmerge.simulate", "rotation.n_sweeps=3", "n_obs_target=20000", "seed=5"],
               cwd=d)
    assert done.returncode == 0, done.stderr
    done = run(["dials.vmerge", "simulated.expt", "simulated.refl", "nproc=1"], cwd=d)
    assert done.returncode == 0, done.stderr
    return str(d / "scaled.expt"), str(d / "scaled.refl")


@pytest.fixture(scope="module")
def one_process(sweeps, tmp_path_factory):
    """{method: directory of the one-process stats run}, 4 half-dataset repeats."""
    expt, refl = sweeps
    out = {}
    for method in ("classical", "robust"):
        d = tmp_path_factory.mktemp(f"one_{method}")
        done = run(["dials.vmerge.stats", expt, refl, f"merging.method={method}",
                    "half_dataset_repeats=4"], cwd=d)
        assert done.returncode == 0, done.stderr
        out[method] = d
    return out


@pytest.mark.parametrize("n_ranks", [2, 3])
@pytest.mark.parametrize("method", ["classical", "robust"])
def test_stats_on_rank_rows_equals_one_process(sweeps, one_process, tmp_path, method, n_ranks):
    expt, refl = sweeps
    done = run(["dials.vmerge.stats", expt, refl, f"merging.method={method}",
                "half_dataset_repeats=4"], cwd=tmp_path, n_ranks=n_ranks)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    reference = one_process[method]
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(reference)) == OUTPUTS
    log = open(tmp_path / "dials.vmerge.stats.log").read()
    # the rank path was taken: each rank held only its own rows (whole groups), every rank
    # some and none all of them
    held = rows_per_rank(tmp_path / "dials.vmerge.stats.log")
    assert held, "stats did not run on the ranks' own rows"
    rows, in_all = held
    total = len(read_reflections(refl))
    assert len(rows) == n_ranks and sum(rows) == in_all == total
    assert all(0 < n < total for n in rows)

    ours = json.load(open(tmp_path / "dials.vmerge.stats.json"))
    theirs = json.load(open(reference / "dials.vmerge.stats.json"))
    half = theirs["half_dataset"][method]
    assert half["repeats"] == 4
    assert half["cc_half"]["overall"]["n"] > 1000 and half["cc_anom"]["overall"]["n"] > 100
    assert 0.9 < half["cc_half"]["overall"]["pearson_mean"] < 1.0
    assert half["cc_half"]["overall"]["pearson_sd"] > 0  # the 4 splits differ
    assert {"merging_statistics", "per_batch", "diagnostics"} <= set(theirs)
    # the same bits: the whole JSON as written (statistics, half-dataset CC1/2 and CCanom,
    # statistics against batch, diagnostics)
    assert open(tmp_path / "dials.vmerge.stats.json").read() == open(
        reference / "dials.vmerge.stats.json").read()
    assert ours == theirs
    assert comparable_log(tmp_path / "dials.vmerge.stats.log") == comparable_log(
        reference / "dials.vmerge.stats.log")
    assert "Half-dataset cross-validation" in log
    assert done.stdout.count("Half-dataset cross-validation") == 1  # rank 0 alone prints


def test_stats_with_two_methods_on_rank_rows(sweeps, tmp_path):
    """Several methods (method_differences compares their merges, gathered on rank 0): each
    method merged on the ranks' own rows at N = 2 (the rank-rows line once per method), and
    the one-process JSON (all three methods: tests/test_mpi_rank_merge_variational.py)."""
    expt, refl = sweeps
    args = ["dials.vmerge.stats", expt, refl, "merging.method=classical+robust",
            "half_dataset_repeats=2"]
    one, two = mpi_helpers.one_process_and_ranks(args, tmp_path, 2, TIMEOUT_S)
    assert rows_per_rank(two / "dials.vmerge.stats.log")
    assert open(two / "dials.vmerge.stats.log").read().count(
        "MPI: merging each rank's own unique reflections") == 2
    report = json.load(open(two / "dials.vmerge.stats.json"))
    assert sorted(report["half_dataset"]) == ["classical", "robust"]
    assert "robust" in report["method_differences"]
    assert open(two / "dials.vmerge.stats.json").read() == open(
        one / "dials.vmerge.stats.json").read()


RANK_HALF_DATASET_SCRIPT = r'''
import json, sys
import numpy as np
import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from cctbx import sgtbx, uctbx
from dials_vmerge.backends import mpi_world
from dials_vmerge.backends.rank_partition import packed_keys
from dials_vmerge.merging import rank_halfdataset
from dials_vmerge.merging.api import HalfDatasetMerger
from dials_vmerge.merging.groups import map_indices_to_asu
from dials_vmerge.merging.halfdataset import half_dataset_statistics

method, variant = sys.argv[1], sys.argv[2]
space_group = sgtbx.space_group_info("P 1 2 1").group()
unit_cell = uctbx.unit_cell((31.0, 42.0, 53.0, 90.0, 101.0, 90.0))
rng = np.random.default_rng(11)
hkl = rng.integers(-8, 9, size=(30000, 3)).astype(np.int32)
hkl = hkl[np.any(hkl != 0, axis=1)]
truth = rng.gamma(1.5, 100.0, 17 ** 3)
intensity = truth[(hkl[:, 0] % 17) * 289 + (np.abs(hkl[:, 1]) % 17) * 17 + np.abs(hkl[:, 2]) % 17]
intensity = intensity + rng.normal(0, 15, len(hkl))
sigma = rng.uniform(5.0, 30.0, len(hkl))
# every rank holds a range of non-anomalous ASU keys (whole groups, input order kept)
keys = packed_keys(map_indices_to_asu(hkl, space_group, anomalous=False)[0])
bounds = np.quantile(np.unique(keys), np.linspace(0, 1, mpi_world.n_ranks() + 1)[1:-1])
owner = np.searchsorted(bounds, keys, side="right")
# batches 1..40, but the last rank's rows only 1..25: it lacks batches 26..40
batch = rng.integers(1, 41, len(hkl))
last = owner == mpi_world.n_ranks() - 1
batch[last] = rng.integers(1, 26, int(last.sum()))
merge = HalfDatasetMerger(method)
one_process = half_dataset_statistics(hkl, intensity, sigma, batch, space_group, unit_cell,
                                      merge, repeats=3, seed=4, n_bins=6)
mine = owner == mpi_world.rank()
if variant == "own_batches":  # each rank splits its own distinct batches: must differ
    rank_halfdataset._all_batches = np.unique
elif variant == "fail_half_merge":  # rank 1's merge of a half fails in the second repeat
    calls = [0]

    def failing(*args):
        calls[0] += 1
        if mpi_world.rank() == 1 and calls[0] == 5:
            raise RuntimeError("injected failure in a half merge")
        return HalfDatasetMerger(method)(*args)

    merge = failing
elif variant == "fail_correlations":  # rank 0's correlations fail in the last repeat
    correlations, calls = rank_halfdataset._correlations, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("injected failure in the correlations")
        return correlations(*args)

    rank_halfdataset._correlations = failing
try:
    ours = rank_halfdataset.rank_half_dataset_statistics(
        hkl[mine], intensity[mine], sigma[mine], batch[mine], space_group, unit_cell, merge,
        repeats=3, seed=4, n_bins=6)
    same, error = json.dumps(ours) == json.dumps(one_process), None
except Exception as e:
    same, error = None, str(e)
with open(f"rank{mpi_world.rank()}.txt", "w") as out:  # printed lines may interleave
    out.write(json.dumps({"rows": int(mine.sum()), "same": same, "error": error,
                          "n_half": one_process["cc_half"]["overall"]["n"],
                          "n_anom": one_process["cc_anom"]["overall"]["n"]}))
'''


@pytest.mark.parametrize("method,n_ranks", [("classical", 2), ("classical", 3), ("robust", 2)])
def test_rank_half_dataset_equals_one_process(tmp_path, method, n_ranks):
    """rank_half_dataset_statistics on each rank's key range (synthetic P2; the last rank's
    rows lack 15 of the 40 batches) equals half_dataset_statistics of all rows exactly, on
    every rank; splitting each rank's own distinct batches instead of all ranks' differs."""
    script = tmp_path / "rank_half_dataset.py"
    script.write_text(RANK_HALF_DATASET_SCRIPT)
    for variant, expected in (("gathered_batches", True), ("own_batches", False)):
        result = subprocess.run([launcher(), "-n", str(n_ranks), sys.executable, str(script),
                                 method, variant], cwd=tmp_path, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, result.stdout + result.stderr
        reports = [json.loads((tmp_path / f"rank{r}.txt").read_text())
                   for r in range(n_ranks)]
        assert all(r["rows"] > 1000 for r in reports)
        assert reports[0]["n_half"] > 500 and reports[0]["n_anom"] > 100
        assert [r["same"] for r in reports] == [expected] * n_ranks, variant


@pytest.mark.parametrize("variant,message", [
    ("fail_half_merge", "injected failure in a half merge"),
    ("fail_correlations", "injected failure in the correlations")])
def test_rank_half_dataset_failure_reaches_every_rank(tmp_path, variant, message):
    """A failure in rank 1's merge of a half, or in rank 0's correlations, raises the same
    error on every rank of 3, none left waiting in a gather."""
    script = tmp_path / "rank_half_dataset.py"
    script.write_text(RANK_HALF_DATASET_SCRIPT)
    result = subprocess.run([launcher(), "-n", "3", sys.executable, str(script), "classical",
                             variant], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    for r in range(3):
        report = json.loads((tmp_path / f"rank{r}.txt").read_text())
        assert report["error"] == message and report["same"] is None, (r, report)


def test_stats_with_ranks_holding_no_rows(tmp_path):
    """dials.scale's quartz output (1620 rows, one key block) at N = 3: ranks 0 and 2 hold
    no row; the JSON is the one-process JSON (robust, 3 repeats)."""
    quartz = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")
    args = ["dials.vmerge.stats", os.path.join(quartz, "scaled.expt"),
            os.path.join(quartz, "scaled.refl"), "merging.method=robust",
            "half_dataset_repeats=3"]
    one, three = mpi_helpers.one_process_and_ranks(args, tmp_path, 3, TIMEOUT_S)
    held = rows_per_rank(three / "dials.vmerge.stats.log")
    assert held and sorted(held[0]) == [0, 0, 1620]
    report = json.load(open(one / "dials.vmerge.stats.json"))
    assert report["half_dataset"]["robust"]["cc_half"]["overall"]["n"] > 50
    assert open(three / "dials.vmerge.stats.json").read() == open(
        one / "dials.vmerge.stats.json").read()
    assert comparable_log(three / "dials.vmerge.stats.log") == comparable_log(
        one / "dials.vmerge.stats.log")


def test_rank_half_dataset_in_one_process():
    """Without a launcher (one rank) the rank version is the one-process function."""
    from cctbx import sgtbx, uctbx

    from dials_vmerge.merging.api import HalfDatasetMerger
    from dials_vmerge.merging.halfdataset import half_dataset_statistics
    from dials_vmerge.merging.rank_halfdataset import rank_half_dataset_statistics

    space_group = sgtbx.space_group_info("P 1 2 1").group()
    unit_cell = uctbx.unit_cell((31.0, 42.0, 53.0, 90.0, 101.0, 90.0))
    rng = np.random.default_rng(3)
    hkl = rng.integers(-6, 7, size=(8000, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    intensity = rng.gamma(1.5, 100.0, len(hkl))
    sigma = rng.uniform(5.0, 30.0, len(hkl))
    batch = rng.integers(1, 20, len(hkl))
    args = (hkl, intensity, sigma, batch, space_group, unit_cell, HalfDatasetMerger("classical"))
    ours = rank_half_dataset_statistics(*args, repeats=3, seed=1, n_bins=5)
    theirs = half_dataset_statistics(*args, repeats=3, seed=1, n_bins=5)
    assert theirs["cc_half"]["overall"]["n"] > 100
    assert json.dumps(ours) == json.dumps(theirs)
