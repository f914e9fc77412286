"""`mpiexec -n 2|3 dials.vmerge.merge scaled.expt scaled.refl` merges each rank's own rows and
gives the one-process outputs (issue 11; merging/rank_merge.py), classical and robust.

Real launcher runs (the `mpi` extra's mpich) on dials.scale's quartz output (1620 rows: one key
block, so the second and third ranks hold no row) and on a small 3-sweep simulation scaled by
dials.vmerge (~20 000 rows, 4 key blocks: every rank holds rows). merged.mtz is read with gemmi
(not our reader): the same unique reflections and every column to 1e-10 relative; the JSON's
merging statistics to 1e-10; the log (statistics table, summary, calibration, batch table)
equal apart from timings and the MPI lines. Bad input under MPI: one line, exit 1, no outputs,
also when only one rank's rows hold the bad value.
"""

import filecmp
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from dials_vmerge import geometry
from dials_vmerge.backends import rank_partition
from dials_vmerge.io import read_experiments, read_reflections, write_reflections

import mpi_helpers
from mpi_helpers import comparable_log, launcher, rows_per_rank

pytest.importorskip("mpi4py")
gemmi = pytest.importorskip("gemmi")

QUARTZ = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")
TIMEOUT_S = 180
OUTPUTS = ["dials.vmerge.merge.html", "dials.vmerge.merge.json", "dials.vmerge.merge.log",
           "merged.mtz"]


def run(args, cwd, n_ranks=None):
    return mpi_helpers.run(args, cwd, n_ranks, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """{name: (scaled.expt, scaled.refl)}."""
    out = {"quartz": (os.path.join(QUARTZ, "scaled.expt"), os.path.join(QUARTZ, "scaled.refl"))}
    d = tmp_path_factory.mktemp("sweeps3")
    done = run(["dials.vmerge.simulate", "rotation.n_sweeps=3", "n_obs_target=20000", "seed=5"],
               cwd=d)
    assert done.returncode == 0, done.stderr
    done = run(["dials.vmerge", "simulated.expt", "simulated.refl", "nproc=1"], cwd=d)
    assert done.returncode == 0, done.stderr
    out["sweeps3"] = (str(d / "scaled.expt"), str(d / "scaled.refl"))
    return out


@pytest.fixture(scope="module")
def single_process(scaled, tmp_path_factory):
    out = {}
    for name, (expt, refl) in scaled.items():
        d = tmp_path_factory.mktemp(f"single_{name}")
        done = run(["dials.vmerge.merge", expt, refl], cwd=d)
        assert done.returncode == 0, done.stderr
        out[name] = d
    return out


def one_process_and_two_ranks(args, tmp_path):
    return mpi_helpers.one_process_and_ranks(args, tmp_path, 2, TIMEOUT_S)


def mtz_columns(path):
    mtz = gemmi.read_mtz_file(str(path))
    hkl = np.array(mtz.make_miller_array(), dtype=np.int64)
    columns = {c.label: np.array(c, dtype=np.float64) for c in mtz.columns
               if c.label not in ("H", "K", "L")}
    return hkl, columns


def assert_close(ours, theirs, path="", rtol=1e-10):
    """Nested JSON values equal, numbers to rtol relative (None/NaN alike)."""
    if isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), path
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{path}/{key}", rtol)
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, f"{path}/{i}", rtol)
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        assert isinstance(ours, (int, float)), path
        assert math.isclose(ours, theirs, rel_tol=rtol, abs_tol=1e-300), (path, ours, theirs)
    else:
        assert ours == theirs, (path, ours, theirs)


@pytest.mark.parametrize("n_ranks", [2, 3])
@pytest.mark.parametrize("name", ["quartz", "sweeps3"])
def test_merge_on_rank_rows_equals_single_process(scaled, single_process, tmp_path, name,
                                                  n_ranks):
    expt, refl = scaled[name]
    done = run(["dials.vmerge.merge", expt, refl], cwd=tmp_path, n_ranks=n_ranks)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    reference = single_process[name]
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(reference)) == OUTPUTS

    log = open(tmp_path / "dials.vmerge.merge.log").read()
    held = rows_per_rank(tmp_path / "dials.vmerge.merge.log")
    assert held, "the merge did not run on the ranks' own rows"
    rows, in_all = held
    total = len(read_reflections(refl))
    assert len(rows) == n_ranks and sum(rows) == in_all == total
    if name == "sweeps3":  # every rank holds whole groups, none holds everything
        assert all(0 < n < total for n in rows)
    assert f"MPI: {n_ranks} ranks; " in log

    hkl, columns = mtz_columns(tmp_path / "merged.mtz")
    hkl_ref, columns_ref = mtz_columns(reference / "merged.mtz")
    assert np.array_equal(hkl, hkl_ref)  # the same unique reflections, in the same order
    assert sorted(columns) == sorted(columns_ref)
    assert {"IMEAN", "SIGIMEAN", "I(+)", "I(-)", "F", "DANO", "FreeR_flag"} <= set(columns)
    for label, values in columns_ref.items():
        ours = columns[label]
        assert np.array_equal(np.isnan(ours), np.isnan(values)), label
        ok = ~np.isnan(values)
        assert np.all(np.abs(ours[ok] - values[ok]) <= 1e-10 * np.abs(values[ok])), label

    ours = json.load(open(tmp_path / "dials.vmerge.merge.json"))
    theirs = json.load(open(reference / "dials.vmerge.merge.json"))
    assert ours["n_observations"] == theirs["n_observations"]
    assert ours["n_unique"] == theirs["n_unique"] == len(hkl)
    for key in ("merging_statistics", "summary_table", "sigma_calibration", "per_batch"):
        assert_close(ours[key], theirs[key], key)
    assert theirs["merging_statistics"]["anomalous_statistics"]["overall"]["cc_anom_n_pairs"] > 0
    # the same bits: merged.mtz byte for byte, and the whole JSON (statistics, sigma
    # calibration, statistics against batch, merge diagnostics, model curves) as written
    assert filecmp.cmp(tmp_path / "merged.mtz", reference / "merged.mtz", shallow=False)
    assert {"sigma_calibration", "per_batch", "diagnostics", "scaling_models"} <= set(theirs)
    assert open(tmp_path / "dials.vmerge.merge.json").read() == open(
        reference / "dials.vmerge.merge.json").read()
    assert comparable_log(tmp_path / "dials.vmerge.merge.log") == comparable_log(
        reference / "dials.vmerge.merge.log")
    assert done.stdout.count("Total observations") == 1  # rank 0 alone prints


@pytest.mark.parametrize("name,n_ranks", [("quartz", 3), ("sweeps3", 2)])
def test_robust_merge_on_rank_rows_equals_single_process(scaled, tmp_path, name, n_ranks):
    """merging.method=robust (a Student-t merge per group) on the ranks' rows: merged.mtz,
    the statistics of its merged intensities (CC1/2 of the robust merges of the same random
    halves) and the log equal one process."""
    expt, refl = scaled[name]
    args = ["dials.vmerge.merge", expt, refl, "merging.method=robust"]
    one, many = mpi_helpers.one_process_and_ranks(args, tmp_path, n_ranks, TIMEOUT_S)
    assert rows_per_rank(many / "dials.vmerge.merge.log")
    hkl, columns = mtz_columns(many / "merged.mtz")
    hkl_ref, columns_ref = mtz_columns(one / "merged.mtz")
    assert np.array_equal(hkl, hkl_ref)
    for label, values in columns_ref.items():
        ok = ~np.isnan(values)
        assert np.array_equal(np.isnan(columns[label]), ~ok), label
        assert np.all(np.abs(columns[label][ok] - values[ok]) <= 1e-10 * np.abs(values[ok]))
    ours = json.load(open(many / "dials.vmerge.merge.json"))
    theirs = json.load(open(one / "dials.vmerge.merge.json"))
    assert theirs["merging_statistics"]["method"] == "robust"
    assert_close(ours["merging_statistics"], theirs["merging_statistics"], "statistics")
    assert filecmp.cmp(many / "merged.mtz", one / "merged.mtz", shallow=False)
    assert open(many / "dials.vmerge.merge.json").read() == open(
        one / "dials.vmerge.merge.json").read()
    assert comparable_log(many / "dials.vmerge.merge.log") == comparable_log(
        one / "dials.vmerge.merge.log")


def test_bad_input_under_mpi_is_one_line(tmp_path):
    """Unscaled input (no inverse_scale_factor): every rank fails alike."""
    done = run(["dials.vmerge.merge", os.path.join(QUARTZ, "integrated.expt"),
                os.path.join(QUARTZ, "integrated.refl")], cwd=tmp_path, n_ranks=2)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not scaled" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == []


def test_nothing_in_resolution_range_under_mpi_is_one_line(scaled, tmp_path):
    """No observation between d_max and d_min on any rank: the one-process line, once."""
    expt, refl = scaled["sweeps3"]
    done = run(["dials.vmerge.merge", expt, refl, "merging.d_min=0.1", "merging.d_max=0.2"],
               cwd=tmp_path, n_ranks=2)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no reflections between" in lines[0], done.stderr
    assert os.listdir(tmp_path) == []


def test_rank_with_no_row_in_resolution_range(scaled, tmp_path):
    """A d range that holds rows of rank 0 only: rank 1's empty share is no error, and the
    merge equals one process."""
    from dials_vmerge.merging.groups import per_index_chunks

    expt, refl = scaled["sweeps3"]
    table = read_reflections(refl)
    experiments = read_experiments(expt)
    keys = rank_partition.non_anomalous_keys(table, geometry.space_group(experiments[0]))
    owner = rank_partition.partition_keys(keys, 2).rank_of_keys(keys)
    d = per_index_chunks(np.asarray(table["miller_index"]),
                         geometry.median_unit_cell(experiments).d)
    order = np.argsort(d)
    d_sorted, owner_sorted = d[order], owner[order]
    # the longest run of rank-0 rows in d order, well inside the data's range
    runs = np.flatnonzero(np.diff(np.r_[-1, owner_sorted, -1] == 0))  # run bounds, paired
    starts, ends = runs[0::2], runs[1::2]
    inner = (starts > 0) & (ends < d.size)
    best = np.argmax(np.where(inner, ends - starts, -1))
    lo, hi = d_sorted[starts[best]], d_sorted[ends[best] - 1]
    assert ends[best] - starts[best] >= 2 and d_sorted[starts[best] - 1] < lo \
        and d_sorted[ends[best]] > hi
    args = ["dials.vmerge.merge", expt, refl, f"merging.d_min={lo - 1e-9:.12f}",
            f"merging.d_max={hi + 1e-9:.12f}"]
    one, two = one_process_and_two_ranks(args, tmp_path)
    hkl, columns = mtz_columns(two / "merged.mtz")
    hkl_ref, columns_ref = mtz_columns(one / "merged.mtz")
    assert np.array_equal(hkl, hkl_ref) and len(hkl) > 0
    assert np.array_equal(columns["IMEAN"], columns_ref["IMEAN"])
    assert comparable_log(two / "dials.vmerge.merge.log") == comparable_log(
        one / "dials.vmerge.merge.log")


def test_bad_value_in_one_ranks_rows_is_one_line(scaled, tmp_path):
    """A NaN intensity in rows that only rank 1 reads: rank 0's rows are fine, yet both
    stop with the one line (exit 1, no outputs, the input untouched)."""
    expt, refl = scaled["sweeps3"]
    table = read_reflections(refl)
    experiments = read_experiments(expt)
    space_group = geometry.space_group(experiments[0])
    keys = rank_partition.non_anomalous_keys(table, space_group)
    partition = rank_partition.partition_keys(keys, 2)
    row = int(partition.rows_of_rank(keys, 1)[0])
    values = np.array(table["intensity.scale.value"], dtype=np.float64)
    values[row] = np.nan
    table["intensity.scale.value"] = values
    bad = tmp_path / "input"
    bad.mkdir()
    write_reflections(table, str(bad / "scaled.refl"))
    shutil.copy(expt, bad / "scaled.expt")
    before = open(bad / "scaled.refl", "rb").read()
    work = tmp_path / "work"
    work.mkdir()
    done = run(["dials.vmerge.merge", str(bad / "scaled.expt"), str(bad / "scaled.refl")],
               cwd=work, n_ranks=2)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN" in lines[0], done.stderr
    assert os.listdir(work) == []
    assert open(bad / "scaled.refl", "rb").read() == before


def test_selections_and_unmerged_mtz_on_rank_rows(scaled, tmp_path):
    """Image exclusion and a resolution cut applied before the partition, and the unmerged
    MTZ (gathered observations, their batch, scale and dials.export columns) at N = 2 equal
    the one-process files (gemmi) and log."""
    expt, refl = scaled["sweeps3"]
    args = ["dials.vmerge.merge", expt, refl, "exclude_images=0:1:20", "merging.d_min=2.0",
            "unmerged_mtz=unmerged.mtz"]
    one, two = one_process_and_two_ranks(args, tmp_path)
    assert rows_per_rank(two / "dials.vmerge.merge.log")
    for name in ("merged.mtz", "unmerged.mtz"):
        hkl, columns = mtz_columns(two / name)
        hkl_ref, columns_ref = mtz_columns(one / name)
        assert np.array_equal(hkl, hkl_ref), name
        assert sorted(columns) == sorted(columns_ref), name
        for label, values in columns_ref.items():
            assert np.array_equal(np.isnan(columns[label]), np.isnan(values)), (name, label)
            ok = ~np.isnan(values)
            assert np.all(np.abs(columns[label][ok] - values[ok])
                          <= 1e-10 * np.abs(values[ok])), (name, label)
    _, unmerged = mtz_columns(two / "unmerged.mtz")
    assert {"BATCH", "SCALEUSED", "XDET", "FRACTIONCALC"} <= set(unmerged)
    assert comparable_log(two / "dials.vmerge.merge.log") == comparable_log(
        one / "dials.vmerge.merge.log")


def test_vmerge_merging_stage_on_rank_rows(scaled, tmp_path):
    """dials.vmerge's merging stage goes the same way: at N = 2 its merge runs on each
    rank's own rows of the scaled table and merged.mtz and the log equal one process."""
    expt, _ = scaled["sweeps3"]
    directory = os.path.dirname(expt)
    args = ["dials.vmerge", os.path.join(directory, "simulated.expt"),
            os.path.join(directory, "simulated.refl"), "nproc=1"]
    one, two = one_process_and_two_ranks(args, tmp_path)
    held = rows_per_rank(two / "dials.vmerge.log")
    assert held and all(n > 0 for n in held[0])
    hkl, columns = mtz_columns(two / "merged.mtz")
    hkl_ref, columns_ref = mtz_columns(one / "merged.mtz")
    assert np.array_equal(hkl, hkl_ref)
    for label in ("IMEAN", "SIGIMEAN", "I(+)", "SIGI(-)", "F", "DANO"):
        ok = ~np.isnan(columns_ref[label])
        assert np.array_equal(np.isnan(columns[label]), ~ok), label
        assert np.all(np.abs(columns[label][ok] - columns_ref[label][ok])
                      <= 1e-10 * np.abs(columns_ref[label][ok])), label
    assert comparable_log(two / "dials.vmerge.log") == comparable_log(one / "dials.vmerge.log")


RANK_STATISTICS_SCRIPT = r'''
import json, sys
import numpy as np
import dials_vmerge  # noqa: F401  (before numba/scipy.special)
from cctbx import sgtbx, uctbx
from dials_vmerge.backends import mpi_world
from dials_vmerge.backends.rank_partition import packed_keys
from dials_vmerge.merging import rank_merge, statistics as st
from dials_vmerge.merging.groups import Groupings, map_indices_to_asu

space_group = sgtbx.space_group_info("P 1 2 1").group()
unit_cell = uctbx.unit_cell((31.0, 42.0, 53.0, 90.0, 101.0, 90.0))
rng = np.random.default_rng(7)
hkl = rng.integers(-9, 10, size=(40000, 3)).astype(np.int32)
hkl = hkl[np.any(hkl != 0, axis=1)]
intensity = rng.gamma(1.5, 100.0, len(hkl)) + rng.normal(0, 20, len(hkl))
sigma = rng.uniform(5.0, 30.0, len(hkl))
sigma[::997] = 0.0  # dropped by the statistics (sigma <= 0)
one_process = st.merging_statistics(hkl, intensity, sigma, space_group, unit_cell, n_bins=10,
                                    with_anomalous_table=True)
# this rank's rows: a range of non-anomalous ASU keys (whole groups, input order kept)
keys = packed_keys(map_indices_to_asu(hkl, space_group, anomalous=False)[0])
bounds = np.quantile(np.unique(keys), np.linspace(0, 1, mpi_world.n_ranks() + 1)[1:-1])
mine = np.searchsorted(bounds, keys, side="right") == mpi_world.rank()
hkl, intensity, sigma = hkl[mine], intensity[mine], sigma[mine]
groupings = Groupings(hkl, space_group, unit_cell)
prep = rank_merge.RankPrepared(intensity, sigma, space_group,
                               st.symmetry_compatible_cell(unit_cell, space_group), False,
                               groupings)
held = [prep.mean, prep.merged_sigma, prep.anom_mean, prep.partner, prep.plus, prep.group_d,
        prep.groups.multiplicity, prep.groups.order, prep.anom.dstar_sq]
if mpi_world.is_output_rank():
    prep.stop_serving()
    assert all(len(x) in (prep.groups.n_groups, prep.anom.n_groups) for x in held)
else:
    prep.serve()
    # the per-group arrays over all groups are on rank 0 alone
    assert all(x is None for x in held), [type(x) for x in held]
del prep
ours = rank_merge.rank_merging_statistics(hkl, intensity, sigma, space_group, unit_cell,
                                          n_bins=10, with_anomalous_table=True,
                                          groupings=groupings)
same = json.dumps(ours.as_dict()) == json.dumps(one_process.as_dict())
# one file per rank: the ranks' printed lines may interleave
with open(f"rank{mpi_world.rank()}.txt", "w") as out:
    out.write(f"rows {len(hkl)} same {same}")
sys.exit(0 if same else 1)
'''


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_rank_statistics_held_on_rank_0_equal_one_process(tmp_path, n_ranks):
    """rank_merge.rank_merging_statistics on each rank's own rows (synthetic, P2, some
    sigma <= 0) gives one process's statistics exactly (as_dict, every table) on every rank,
    while the arrays over all groups lie on rank 0 alone (the other ranks answer its
    half-split requests)."""
    script = tmp_path / "rank_statistics.py"
    script.write_text(RANK_STATISTICS_SCRIPT)
    result = subprocess.run([launcher(), "-n", str(n_ranks), sys.executable, str(script)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(n_ranks):
        assert "same True" in (tmp_path / f"rank{rank}.txt").read_text()


# the data and rank rows of RANK_STATISTICS_SCRIPT, then one failure injected (argv[1]):
# rank 0's shell code, or rank 1's answer to a half-split request
RANK_STATISTICS_FAILURE_SCRIPT = RANK_STATISTICS_SCRIPT.split("prep = rank_merge")[0] + r'''
where = sys.argv[1]
if where == "shell_code":
    shell_statistics = st._shell_statistics
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if mpi_world.rank() == 0 and calls[0] == 3:
            raise RuntimeError("injected failure in a shell")
        return shell_statistics(*args, **kwargs)

    st._shell_statistics = failing
else:
    half_means = rank_merge.half_means_from_draw_starts

    def failing(*args, **kwargs):
        if mpi_world.rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        return half_means(*args, **kwargs)

    rank_merge.half_means_from_draw_starts = failing
try:
    rank_merge.rank_merging_statistics(hkl, intensity, sigma, space_group, unit_cell,
                                       n_bins=10, with_anomalous_table=True,
                                       groupings=groupings)
    outcome = "no error"
except Exception as e:
    outcome = f"error: {e}"
with open(f"rank{mpi_world.rank()}.txt", "w") as out:  # printed lines may interleave
    out.write(outcome)
'''


@pytest.mark.parametrize("where,message", [("shell_code", "injected failure in a shell"),
                                           ("answer", "injected failure on rank 1")])
def test_rank_statistics_failure_reaches_every_rank(tmp_path, where, message):
    """A failure in rank 0's shell code or in another rank's answer to a half-split request
    raises the same error on every rank (which the merge logs as "Merging statistics could
    not be computed"), none left waiting for a request."""
    script = tmp_path / "rank_statistics_failure.py"
    script.write_text(RANK_STATISTICS_FAILURE_SCRIPT)
    result = subprocess.run([launcher(), "-n", "3", sys.executable, str(script), where],
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(3):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"error: {message}"
