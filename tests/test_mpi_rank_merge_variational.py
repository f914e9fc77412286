"""merging.method=variational on each MPI rank's own rows, and dials.vmerge.stats comparing
several methods there (issue 11; merging/rank_variational.py, rank_merge.py,
rank_halfdataset.py): the Wilson Sigma(d) is fitted by EM over every rank's groups with the
one-process bins and per-bin sums, so the outputs are byte-identical to one process.

Real launcher runs (the `mpi` extra's mpich) on a 3-sweep simulation (~21 000 rows: every
rank holds rows) and dials.scale's quartz output (1620 rows in one key block: at N = 3 two
ranks hold no row, so their EM runs on no group), and a script under the launcher that
merges synthetic rows split into key ranges (P2, whose anomalous group order interleaves the
ranks' groups) with the rank functions and compares them with the one-process functions,
and shows that fitting Sigma on each rank's own groups gives other values.
"""

import filecmp
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
gemmi = pytest.importorskip("gemmi")

QUARTZ = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")
TIMEOUT_S = 240


def run(args, cwd, n_ranks=None):
    return mpi_helpers.run(args, cwd, n_ranks, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Directory with simulated.expt/.refl (3 sweeps, ~21 000 rows) and their
    scaled.expt/.refl from dials.vmerge."""
    d = tmp_path_factory.mktemp("sweeps3")
    done = run(["dials.vmerge.simulate", "rotation.n_sweeps=3", "n_obs_target=20000", "seed=5"],
               cwd=d)
    assert done.returncode == 0, done.stderr
    done = run(["dials.vmerge", "simulated.expt", "simulated.refl", "nproc=1"], cwd=d)
    assert done.returncode == 0, done.stderr
    return d


def runs_at_1_2_3(args, tmp_path):
    """{N: output directory} of `args` as one process (N = 1, no launcher) and under 2 and 3
    ranks; every run must succeed with nothing on stderr."""
    out = {}
    for n in (1, 2, 3):
        d = tmp_path / f"n{n}"
        d.mkdir()
        done = run(args, cwd=d, n_ranks=None if n == 1 else n)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
        out[n] = d
    return out


def same_files(runs, names):
    for name in names:
        for n in (2, 3):
            assert filecmp.cmp(runs[n] / name, runs[1] / name, shallow=False), (name, n)


def imean(path):
    mtz = gemmi.read_mtz_file(str(path))
    return {c.label: np.array(c, dtype=np.float64) for c in mtz.columns}


@pytest.mark.parametrize("dof", [0, 4])
def test_merge_variational_on_rank_rows(sweeps, tmp_path, dof):
    """dials.vmerge.merge merging.method=variational (Gaussian and Student-t likelihood):
    merged.mtz, the JSON (statistics of the variational merges, CC1/2 of the halves merged
    with Sigma fixed, calibration, per batch, diagnostics) and the log at N = 2, 3 are the
    one-process ones, byte for byte, with each rank holding only its own rows."""
    args = ["dials.vmerge.merge", str(sweeps / "scaled.expt"), str(sweeps / "scaled.refl"),
            "merging.method=variational"] + ([f"merging.variational.dof={dof}"] if dof else [])
    runs = runs_at_1_2_3(args, tmp_path)
    total = len(read_reflections(str(sweeps / "scaled.refl")))
    assert rows_per_rank(runs[1] / "dials.vmerge.merge.log") is None
    for n in (2, 3):
        rows, in_all = rows_per_rank(runs[n] / "dials.vmerge.merge.log")
        assert len(rows) == n and sum(rows) == in_all == total
        assert all(0 < r < total for r in rows)
    same_files(runs, ["merged.mtz", "dials.vmerge.merge.json"])
    for n in (2, 3):
        assert comparable_log(runs[n] / "dials.vmerge.merge.log") == comparable_log(
            runs[1] / "dials.vmerge.merge.log")
    report = json.load(open(runs[1] / "dials.vmerge.merge.json"))
    assert report["method"] == "variational"
    assert report["merging_statistics"]["method"] == "variational"
    # variational merges: posterior means of J >= 0 are positive and F is the posterior's
    # (not French-Wilson's: F^2 < E[J] by Jensen where the posterior has spread)
    columns = imean(runs[3] / "merged.mtz")
    assert np.all(columns["IMEAN"] > 0)
    assert np.all(columns["F"] ** 2 < columns["IMEAN"])


def test_merge_variational_with_ranks_holding_no_rows(tmp_path):
    """dials.scale's quartz output at N = 3: two ranks hold no row (their EM steps run on no
    group); merged.mtz and the JSON are the one-process ones."""
    args = ["dials.vmerge.merge", os.path.join(QUARTZ, "scaled.expt"),
            os.path.join(QUARTZ, "scaled.refl"), "merging.method=variational"]
    one, three = mpi_helpers.one_process_and_ranks(args, tmp_path, 3, TIMEOUT_S)
    held = rows_per_rank(three / "dials.vmerge.merge.log")
    assert held and sorted(held[0]) == [0, 0, 1620]
    for name in ("merged.mtz", "dials.vmerge.merge.json"):
        assert filecmp.cmp(three / name, one / name, shallow=False), name


def test_vmerge_scaling_and_variational_merge(sweeps, tmp_path):
    """dials.vmerge (scaling rank-local, then the variational merge on the ranks' rows):
    scaled.refl, scaled.expt, merged.mtz and dials.vmerge.json at N = 2, 3 are the
    one-process files."""
    args = ["dials.vmerge", str(sweeps / "simulated.expt"), str(sweeps / "simulated.refl"),
            "nproc=1", "merging.method=variational"]
    runs = runs_at_1_2_3(args, tmp_path)
    for n in (2, 3):
        log = open(runs[n] / "dials.vmerge.log").read()
        assert "MPI: scaling each rank's own unique reflections" in log
        assert rows_per_rank(runs[n] / "dials.vmerge.log")
    same_files(runs, ["scaled.refl", "scaled.expt", "merged.mtz", "dials.vmerge.json"])
    report = json.load(open(runs[1] / "dials.vmerge.json"))
    assert report["merging"]["method"] == "variational"


def test_stats_all_methods_on_rank_rows(sweeps, tmp_path):
    """dials.vmerge.stats merging.method=all: each method's merge, statistics and half-dataset
    cross-validation on the ranks' rows (the rank-rows line once per method), the comparison
    (method_differences, the side-by-side CC1/2 table) and the whole JSON equal one process."""
    args = ["dials.vmerge.stats", str(sweeps / "scaled.expt"), str(sweeps / "scaled.refl"),
            "merging.method=all", "half_dataset_repeats=3"]
    runs = runs_at_1_2_3(args, tmp_path)
    for n in (2, 3):
        log = open(runs[n] / "dials.vmerge.stats.log").read()
        assert log.count("MPI: merging each rank's own unique reflections") == 3
    same_files(runs, ["dials.vmerge.stats.json"])
    for n in (2, 3):
        assert comparable_log(runs[n] / "dials.vmerge.stats.log") == comparable_log(
            runs[1] / "dials.vmerge.stats.log")
    report = json.load(open(runs[1] / "dials.vmerge.stats.json"))
    assert sorted(report["half_dataset"]) == ["classical", "robust", "variational"]
    assert sorted(report["method_differences"]) == ["robust", "variational"]
    for method, half in report["half_dataset"].items():
        assert 0.9 < half["cc_half"]["overall"]["pearson_mean"] < 1.0, method
        assert half["cc_half"]["overall"]["pearson_sd"] > 0, method  # the splits differ
    # variational merges shrink towards the prior: they differ from the classical ones
    assert report["method_differences"]["variational"]["overall_rms"] > 0


RANK_VARIATIONAL_SCRIPT = r'''
import json, sys
import numpy as np
import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from cctbx import sgtbx, uctbx
from dials_vmerge.backends import mpi_world
from dials_vmerge.backends.rank_partition import packed_keys
from dials_vmerge.merging import rank_variational
from dials_vmerge.merging.api import HalfDatasetMerger, merge_groups
from dials_vmerge.merging.groups import Groupings, map_indices_to_asu
from dials_vmerge.merging.halfdataset import half_dataset_statistics
from dials_vmerge.merging.rank_halfdataset import rank_half_dataset_statistics


class Params:  # merging.variational.dof and n_bins
    class merging:
        class variational:
            dof = float(sys.argv[1])
            n_bins = 6

space_group = sgtbx.space_group_info("P 1 2 1").group()
unit_cell = uctbx.unit_cell((31.0, 42.0, 53.0, 90.0, 101.0, 90.0))
rng = np.random.default_rng(7)
hkl = rng.integers(-7, 8, size=(8000, 3)).astype(np.int32)
hkl = hkl[np.any(hkl != 0, axis=1)]
truth = rng.exponential(200.0, 15 ** 3)
intensity = truth[(hkl[:, 0] % 15) * 225 + (np.abs(hkl[:, 1]) % 15) * 15 + np.abs(hkl[:, 2]) % 15]
sigma = rng.uniform(30.0, 300.0, len(hkl))  # noisy: the prior shrinks
intensity = intensity + rng.normal(0, 1, len(hkl)) * sigma
batch = rng.integers(1, 31, len(hkl))
keys = packed_keys(map_indices_to_asu(hkl, space_group, anomalous=False)[0])
bounds = np.quantile(np.unique(keys), np.linspace(0, 1, mpi_world.n_ranks() + 1)[1:-1])
mine = np.searchsorted(bounds, keys, side="right") == mpi_world.rank()
one = Groupings(hkl, space_group, unit_cell)
own = Groupings(hkl[mine], space_group, unit_cell)
report = {"rows": int(mine.sum())}
for anomalous in (False, True):
    full = merge_groups("variational", one.get(anomalous), intensity, sigma, Params,
                        french_wilson_amplitudes=False)
    ours = rank_variational.merge_variational_rank_rows(own.get(anomalous), intensity[mine],
                                                        sigma[mine], Params)
    # each rank's Sigma fitted on its own groups only: the EM without the reductions
    alone = merge_groups("variational", own.get(anomalous), intensity[mine], sigma[mine],
                         Params, french_wilson_amplitudes=False)
    at = np.flatnonzero(np.isin(packed_keys(full.asu_index), packed_keys(ours.asu_index)))
    assert np.array_equal(full.asu_index[at], ours.asu_index)
    same = all(np.array_equal(a[at], b) for a, b in (
        (full.intensity, ours.intensity), (full.sigma, ours.sigma),
        (full.amplitude, ours.amplitude), (full.amplitude_sigma, ours.amplitude_sigma),
        (full.extra["wilson_sigma_per_group"], ours.extra["wilson_sigma_per_group"])))
    report[f"same_{anomalous}"] = bool(same and np.array_equal(
        full.extra["wilson_sigma_bins"], ours.extra["wilson_sigma_bins"])
        and full.extra["em_iterations"] == ours.extra["em_iterations"])
    report[f"alone_same_{anomalous}"] = bool(np.array_equal(full.intensity[at], alone.intensity))
    report[f"em_iterations_{anomalous}"] = int(full.extra["em_iterations"])
    # the median of the per-group Sigma from the bins and their counts over the ranks
    merger = rank_variational.RankMethodMerger("variational", Params, [ours, ours])
    report[f"median_{anomalous}"] = bool(
        merger.median[anomalous] == np.median(full.extra["wilson_sigma_per_group"]))
half_one = half_dataset_statistics(hkl, intensity, sigma, batch, space_group, unit_cell,
                                   HalfDatasetMerger("variational", Params), repeats=2,
                                   seed=3, n_bins=5)
half_ours = rank_half_dataset_statistics(hkl[mine], intensity[mine], sigma[mine], batch[mine],
                                         space_group, unit_cell,
                                         HalfDatasetMerger("variational", Params), repeats=2,
                                         seed=3, n_bins=5)
report["half_same"] = json.dumps(half_one) == json.dumps(half_ours)
report["half_n"] = half_one["cc_half"]["overall"]["n"]
with open(f"rank{mpi_world.rank()}.txt", "w") as out:
    out.write(json.dumps(report))
'''


@pytest.mark.parametrize("dof,n_ranks", [(0, 2), (0, 3), (4, 3)])
def test_rank_variational_merge_equals_one_process(tmp_path, dof, n_ranks):
    """merge_variational_rank_rows on each rank's key range (synthetic P2, Friedel mates
    together and apart) gives the one-process merge of all rows bit for bit on every rank
    (values, amplitudes, Sigma per group and bin, EM iterations), the rank median of the
    per-group Sigma is np.median's, and the half-dataset cross-validation with Sigma fitted
    over the ranks is the one-process result; the EM on a rank's groups alone differs."""
    script = tmp_path / "rank_variational.py"
    script.write_text(RANK_VARIATIONAL_SCRIPT)
    result = subprocess.run([launcher(), "-n", str(n_ranks), sys.executable, str(script),
                             str(dof)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    for r in range(n_ranks):
        report = json.loads((tmp_path / f"rank{r}.txt").read_text())
        assert report["rows"] > 1000, report
        for anomalous in (False, True):
            assert report[f"same_{anomalous}"], (r, anomalous)
            assert not report[f"alone_same_{anomalous}"], (r, anomalous)
            assert report[f"em_iterations_{anomalous}"] > 2
            assert report[f"median_{anomalous}"], (r, anomalous)
        assert report["half_same"], r
        assert report["half_n"] > 500


def test_median_of_binned_is_np_median():
    from dials_vmerge.merging.rank_variational import median_of_binned

    rng = np.random.default_rng(2)
    for trial in range(200):
        n_bins = int(rng.integers(1, 8))
        values = rng.choice(rng.uniform(0.5, 50.0, n_bins), n_bins)  # some equal values
        counts = rng.integers(0, 6, n_bins)
        if counts.sum() == 0:
            assert np.isnan(median_of_binned(values, counts))
            continue
        assert median_of_binned(values, counts) == np.median(np.repeat(values, counts)), trial
