"""Cross-validation under MPI, rank-local (issue 11): with `mpiexec -n N dials.vmerge
cross_validation.cross_validation_mode=single|multi ...` each rank partitions the input once
(pipeline.rank_local_input), every fold's free-set job scales a copy of the rank's own rows,
and the work/free Rmeas and CC1/2 come from the ranks' rows together
(rank_merge.rank_merging_statistics), so the results are the one-process numbers bit for bit.

Runs tests/cross_validation_driver.py (dials.vmerge's `run` with recorders) as one process and
under mpiexec -n 2 and -n 3 on a 3-sweep rotation simulation (mode=multi over
physical.absorption_correction, 2 folds: 4 jobs) and on 200 KB stills (mode=single, 2 folds;
at N = 3 some stills have no row on some rank). Checked: every job's six statistics as
float.hex on every rank; every rank's log (the summary table included) against one
process's; the partition ran once per rank and each job held only the rank's rows, with the
input table gone; the first job's scaled rows gathered from the ranks equal one process's;
and its work and free Rmeas against an independent recomputation from those rows (numpy
group sums over cctbx's ASU indices). Also: a configuration that is not rank-local (a
stand-in: every real one is rank-local since session 12) keeps the repeated path for its
jobs with the same table, and a bad parameter under MPI is one line on stderr, exit 1.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)

import mpi_helpers
from mpi_helpers import launcher
from test_mpi_rank_local_scaling import comparable

pytest.importorskip("mpi4py")

DRIVER = os.path.join(os.path.dirname(__file__), "cross_validation_driver.py")
TIMEOUT_S = 300
CASES = {
    "sweeps3": ["cross_validation.cross_validation_mode=multi",
                "cross_validation.parameter=physical.absorption_correction",
                "cross_validation.nfolds=2"],
    "stills200": ["cross_validation.cross_validation_mode=single", "cross_validation.nfolds=2"],
}


def run_driver(expt, refl, cwd, n_ranks=None, extra=(), env_extra=None):
    command = [sys.executable, DRIVER, expt, refl, "nproc=1"] + list(extra)
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    env = dict(os.environ, CV_OUT=str(cwd / "out.npz"), **(env_extra or {}))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def datasets(rank_local_simulations):
    return rank_local_simulations


@pytest.fixture(scope="module")
def results(datasets, tmp_path_factory):
    """{(name, n_ranks or None): the driver's .npz}."""
    out = {}
    for name, (expt, refl) in datasets.items():
        for n_ranks in (None, 2, 3):
            d = tmp_path_factory.mktemp(f"cv_{name}_{n_ranks}")
            done = run_driver(expt, refl, d, n_ranks, CASES[name])
            assert done.returncode == 0, done.stderr
            out[name, n_ranks] = dict(np.load(d / "out.npz"))
    return out


def summary_table(lines):
    """The log's cross-validation table (the lines after its title)."""
    start = lines.index("Summary of the cross validation analysis:") + 1
    table = []
    for line in lines[start:]:
        if not line.startswith(("+", "|")):
            break
        table.append(line)
    return table


@pytest.mark.parametrize("name", ["sweeps3", "stills200"])
@pytest.mark.parametrize("n_ranks", [2, 3])
def test_cross_validation_equals_one_process(results, name, n_ranks):
    one, many = results[name, None], results[name, n_ranks]
    one_results = json.loads(str(one["results"]))
    assert len(one_results) == 1 and len(one_results[0]) == (4 if name == "sweeps3" else 2)
    # the folds differ (another free set each): the comparison below is not of constants
    assert one_results[0][0] != one_results[0][1]
    for rank_results in json.loads(str(many["results"])):
        assert rank_results == one_results[0]
    one_log = comparable(json.loads(str(one["log_lines"]))[0])
    table = summary_table(one_log)
    assert len(table) == 4 + 2 * (2 if name == "sweeps3" else 1), table
    assert "free Rmeas" in table[1] and "std dev" in table[4]
    for lines in json.loads(str(many["log_lines"])):
        assert comparable(lines) == one_log
    # the first job's scaled rows of all ranks, in output order: one process's, bit for bit
    for column in ("first_miller_index", "first_inverse_scale_factor",
                   "first_intensity_scale_value", "first_intensity_scale_variance",
                   "first_flags", "first_key"):
        np.testing.assert_array_equal(one[column], many[column], err_msg=column)


@pytest.mark.parametrize("name", ["sweeps3", "stills200"])
@pytest.mark.parametrize("n_ranks", [2, 3])
def test_each_rank_partitions_once_and_holds_its_own_rows(results, name, n_ranks):
    one, many = results[name, None], results[name, n_ranks]
    n_rows = int(one["input_rows"][0])
    # one process: every job scales a copy of the whole input (no partition of rank rows)
    assert list(one["partitions"]) == [0]
    assert all(job["rows"] == n_rows and not job["rank_rows"]
               for job in json.loads(str(one["jobs"]))[0])
    # N ranks: the read-time partition ran once on each rank, for every job
    assert list(many["partitions"]) == [1] * n_ranks
    jobs = json.loads(str(many["jobs"]))
    n_jobs = len(jobs[0])
    assert n_jobs == len(json.loads(str(one["jobs"]))[0])
    for k in range(n_jobs):
        rows = [rank_jobs[k]["rows"] for rank_jobs in jobs]
        # each rank's own rows, the same share in every job, none held twice
        assert sum(rows) == n_rows and max(rows) < 0.7 * n_rows, rows
        assert rows == [rank_jobs[0]["rows"] for rank_jobs in jobs]
        assert all(rank_jobs[k]["rank_rows"] for rank_jobs in jobs)
        # the input table (all rows) is gone before the first job starts
        assert not any(rank_jobs[k]["input_alive"] for rank_jobs in jobs)


def cctbx_asu(miller_index, hall_symbol):
    """Non-anomalous ASU indices by cctbx's map_to_asu."""
    from cctbx import crystal, miller, sgtbx
    from cctbx.array_family import flex

    symmetry = crystal.symmetry(space_group=sgtbx.space_group(hall_symbol))
    indices = flex.miller_index([tuple(int(v) for v in row) for row in miller_index])
    return np.array(miller.set(symmetry, indices, anomalous_flag=False).map_to_asu()
                    .indices(), dtype=np.int64).reshape(-1, 3)


def independent_rmeas(asu, intensity, sigma):
    """Rmeas of unmerged I, sigma grouped by ASU index: the inverse-variance mean of each
    group (observations with sigma above 1e-6 of the group's largest, as cctbx), then over
    groups of n >= 2: sum sqrt(n / (n - 1)) sum |I - <I>| / sum I."""
    keep = sigma > 0
    asu, intensity, sigma = asu[keep], intensity[keep], sigma[keep]
    _, group = np.unique(asu, axis=0, return_inverse=True)
    group = group.ravel()
    largest = np.zeros(group.max() + 1)
    np.maximum.at(largest, group, sigma)
    used = sigma > 1e-6 * largest[group]
    w = np.where(used, 1.0 / sigma**2, 0.0)
    mean = np.bincount(group, w * intensity) / np.bincount(group, w)
    n = np.bincount(group)
    deviation = np.bincount(group, np.abs(intensity - mean[group]))
    total = np.bincount(group, intensity)
    multi = n > 1
    return float((np.sqrt(n[multi] / (n[multi] - 1.0)) * deviation[multi]).sum()
                 / total[multi].sum())


@pytest.mark.parametrize("name", ["sweeps3", "stills200"])
def test_work_and_free_rmeas_against_an_independent_recomputation(results, name):
    """The first job (fold 1, free_set_offset 0) scored from its own scaled rows, gathered
    from 3 ranks, by a computation that shares no code with merging/statistics.py."""
    from dials_vmerge import flags
    from dials_vmerge.scaling.free_set import free_set_mask

    many = results[name, 3]
    first = [float.fromhex(v) for v in json.loads(str(many["results"]))[0][0]]
    hall = json.loads(str(many["experiments"]))["crystal"][0]["space_group_hall_symbol"]
    scaled = (many["first_flags"] & np.uint64(flags.scaled)) != 0
    g = many["first_inverse_scale_factor"][scaled]
    intensity = many["first_intensity_scale_value"][scaled] / g
    sigma = np.sqrt(many["first_intensity_scale_variance"][scaled]) / g
    asu = cctbx_asu(many["first_miller_index"][scaled], hall)
    free = free_set_mask(asu, 10.0, 0)
    assert 0.05 < free.mean() < 0.15
    work_r = independent_rmeas(asu[~free], intensity[~free], sigma[~free])
    free_r = independent_rmeas(asu[free], intensity[free], sigma[free])
    assert work_r == pytest.approx(first[0], rel=1e-12)
    assert free_r == pytest.approx(first[1], rel=1e-12)
    assert first[2] == first[1] - first[0]
    assert 0.9 < first[3] <= 1.0 and 0.9 < first[4] <= 1.0  # CC1/2 of good simulated data


def test_configuration_not_rank_local_keeps_the_repeated_path(datasets, tmp_path):
    """parameter=anomalous with the anomalous=True job kept off the rank-local path (the
    driver's CV_REPEATED_WHEN_TRUE: every real configuration is rank-local since session 12):
    that job scales all rows on every rank, the anomalous=False job is rank-local
    (partitioned for that job); the results are one process's, bit for bit."""
    expt, refl = datasets["stills200"]
    extra = ["cross_validation.cross_validation_mode=multi", "cross_validation.parameter=anomalous"]
    out = {}
    for n_ranks in (None, 2):
        d = tmp_path / f"ranks{n_ranks}"
        d.mkdir()
        done = run_driver(expt, refl, d, n_ranks, extra, {"CV_REPEATED_WHEN_TRUE": "anomalous"})
        assert done.returncode == 0, done.stderr
        out[n_ranks] = dict(np.load(d / "out.npz"))
    one_results = json.loads(str(out[None]["results"]))[0]
    assert one_results[0] != one_results[1]
    for rank_results in json.loads(str(out[2]["results"])):
        assert rank_results == one_results
    n_rows = int(out[None]["input_rows"][0])
    jobs = json.loads(str(out[2]["jobs"]))
    # every job is given all rows (the repeated path needs them); the anomalous=False job
    # takes its rank's rows itself (its own partition, once per rank), the other none
    assert all(job["rows"] == n_rows and not job["rank_rows"]
               for rank_jobs in jobs for job in rank_jobs)
    assert list(out[2]["partitions"]) == [1, 1]
    one_log = comparable(json.loads(str(out[None]["log_lines"]))[0])
    for lines in json.loads(str(out[2]["log_lines"])):
        assert comparable(lines) == one_log


def test_bad_parameter_under_mpi_is_one_line(datasets, tmp_path):
    expt, refl = datasets["stills200"]
    done = mpi_helpers.run(["dials.vmerge", expt, refl,
                            "cross_validation.cross_validation_mode=multi",
                            "cross_validation.parameter=absorption_correction"],
                           cwd=tmp_path, n_ranks=2, timeout_s=TIMEOUT_S)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["dials.vmerge: error: cross_validation.parameter=absorption_correction: "
                     "not a parameter (give the full path, e.g. "
                     "physical.absorption_correction)"], done.stderr
    assert sorted(os.listdir(tmp_path)) == []
