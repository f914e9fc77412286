"""The intensity combination (Imid search) and the error model on each MPI rank's own rows
(issue 11, a rank-local job): the one-process results bit for bit.

tests/mpi_rank_local_stage_runs.py runs dials.vmerge's job on simulated data up to the
scaling run; there each rank builds a ScalingRun on its own rows (whole unique reflections of
its key range of the job's read-time partition, as the read-time partition gives a rank-local
job), takes g and the outlier flags of a run on all rows, and runs combine_intensities and
refine_error_models inside rank_local.rank_local_job(). Asserted against the same driver run
as one process (no launcher):

- every candidate Imid, every Rmeas line and the chosen Imid, the (a, b) of every dataset
  (as float.hex: bit for bit) and the log lines, on every rank, for N = 2 and 3;
- the combined intensities of the rank's rows equal the run on all rows (in the driver);
- negative checks, so that the above can fail: the candidates from a rank's own test rows
  alone (np.mean, np.max: what a rank-local job without the reductions would use) differ on
  some rank, and the local run's error model outside the rank-local job (sums and counts
  over its own rows only) gives another (a, b) or fails on some rank.
"""

import json
import os
import subprocess
import sys

import pytest

from mpi_helpers import launcher

pytest.importorskip("mpi4py")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_rank_local_stage_runs.py")
COMPARED = ("combine_full", "combine_local", "imid_full", "imid_local", "candidates",
            "em_full", "em_local", "ab_full", "ab_local")


def run_driver(tmp_path, name, n_ranks, mode, seed, size, *phil, timeout_s=400):
    """The driver's per-rank results; n_ranks None: one process without a launcher."""
    out = str(tmp_path / name)
    command = [sys.executable, DRIVER, out, mode, str(seed), str(size), *phil]
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(sys.executable), "..",
                                                   "numba_cache"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.load(open(f"{out}.{r}.json")) for r in range(n_ranks or 1)]


def check_ranks_equal_one_process(one, ranks):
    (reference,) = one
    assert reference["n_ranks"] == 1
    assert reference["rows"][0] == reference["rows"][1]
    # the one-process run of the driver: its "local" run is the run on all rows
    for key in COMPARED:
        if key != "candidates":
            assert reference[key.replace("_local", "_full")] == reference[key], key
    assert reference["candidates"], "the Imid candidates were not searched"
    assert any(line.startswith("Error model: a = ") for line in reference["em_full"])
    held = [r["rows"][0] for r in ranks]
    assert sum(held) == reference["rows"][1] and all(r["n_ranks"] == len(ranks) for r in ranks)
    for r in ranks:
        for key in COMPARED:
            assert r[key] == reference[key], (r["rank"], key)
    # negative checks: without the reductions over ranks the results differ
    assert any(r["candidates_rank_only"] != reference["candidates"] for r in ranks)
    for r in ranks:  # each candidate list: 0, 1, avg, max/10, ...
        for own, every in zip(r["candidates_rank_only"], reference["candidates"]):
            assert own[:2] == every[:2]
    assert any(r["em_rank_only"] != reference["em_full"] or r["ab_rank_only"] != reference["ab_full"]
               for r in ranks)


@pytest.fixture(scope="module")
def rotation_one(tmp_path_factory):
    return run_driver(tmp_path_factory.mktemp("one"), "one", None, "rotation", 7, 30000)


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_rotation_imid_and_error_model_on_rank_rows(tmp_path, rotation_one, n_ranks):
    ranks = run_driver(tmp_path, "ranks", n_ranks, "rotation", 7, 30000)
    check_ranks_equal_one_process(rotation_one, ranks)
    # the key ranges split the rows (none of them all on one rank)
    assert all(0 < r["rows"][0] < r["rows"][1] for r in ranks)


def test_individual_error_model_on_rank_rows(tmp_path):
    # minimisation=individual: filtered on the ranks' rows, fitted on the gathered table
    phil = ("weighting.error_model.basic.minimisation=individual",)
    one = run_driver(tmp_path, "one", None, "rotation", 7, 30000, *phil)
    ranks = run_driver(tmp_path, "ranks", 2, "rotation", 7, 30000, *phil)
    check_ranks_equal_one_process(one, ranks)


def test_stills_imid_and_error_model_on_rank_rows(tmp_path):
    # 40 stills (the stills filter of the error model; partialities; one Imid for all)
    one = run_driver(tmp_path, "one", None, "stills", 3, 40)
    ranks = run_driver(tmp_path, "ranks", 2, "stills", 3, 40)
    check_ranks_equal_one_process(one, ranks)
    assert len(one[0]["imid_full"]) == 40


def test_per_dataset_imid_and_anomalous_error_model_on_rank_rows(tmp_path):
    # joint_analysis=False (one search per sweep, over the key blocks) and anomalous=True
    # (the run's own grouping is anomalous; the error model's non-anomalous keys mapped)
    phil = ("reflection_selection.combine.joint_analysis=False", "anomalous=True")
    one = run_driver(tmp_path, "one", None, "rotation", 11, 30000, *phil)
    ranks = run_driver(tmp_path, "ranks", 3, "rotation", 11, 30000, *phil)
    check_ranks_equal_one_process(one, ranks)
    assert len(one[0]["candidates"]) == 2


FUNCTION_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "mpi_rank_local_function_runs.py")


def run_function_driver(tmp_path, name, n_ranks, empty_rank, kind, minimisation, seed=5):
    out = str(tmp_path / name)
    command = [sys.executable, FUNCTION_DRIVER, out, str(seed), str(empty_rank), kind,
               minimisation]
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.load(open(f"{out}.{r}.json")) for r in range(n_ranks or 1)]


@pytest.mark.parametrize("kind, minimisation", [("rotation", "auto"), ("stills", "auto"),
                                                ("rotation", "individual"),
                                                ("rotation", "regression")])
def test_functions_with_a_rank_that_holds_nothing(tmp_path, kind, minimisation):
    # choose_imid and refine_error_model (rotation filter, or the stills filter; the
    # likelihood fit, or individual / regression on the gathered filtered table) on each
    # rank's rows of a key partition in which one rank owns no block: rank 0 of 3, rank 1
    # of 2. g: the simulation's true scales; the likelihood and the individual fit recover
    # the simulated a = 1.3, b = 0.03 to a few per cent (so the data exercise the fit, not
    # a failure; the regression is a cruder estimate: a = 0.73, b = 0.22 here).
    (one,) = run_function_driver(tmp_path, "one", None, -1, kind, minimisation)
    assert isinstance(one["ab"], list), one["ab"]
    a, b = (float.fromhex(v) for v in one["ab"])
    if minimisation != "regression":
        assert 1.2 < a < 1.4 and 0.02 < b < 0.04
    assert len(one["imid_log"]) >= 5
    for n_ranks, empty in ((3, 0), (2, 1)):
        ranks = run_function_driver(tmp_path, f"ranks{n_ranks}", n_ranks, empty, kind,
                                    minimisation)
        assert ranks[empty]["rows"] == 0
        assert sum(r["rows"] for r in ranks) == one["rows"]
        for r in ranks:
            assert (r["imid_log"], r["imid"], r["ab"]) == (one["imid_log"], one["imid"],
                                                           one["ab"]), (n_ranks, r["rank"])
