"""dials.vmerge after scaling when each MPI rank holds only its own rows (issue 11, a
rank-local job): scaled.refl written by rank 0 from windows gathered column by column
(io/rank_local_refl.py), the merge and statistics on the rank's rows as they are, the
report's outlier summary and model curves from every rank's rows.

Until pipeline.run_scaling_job returns a rank-local table, rank_local_outputs_driver.py builds
one from a one-process run's scaled.refl (each rank its rows, `output_order_key` = their row
numbers in that file) and runs the real dials.vmerge from there, under the real launcher.
Every output must equal the one-process run's: scaled.refl and scaled.expt byte for byte
(`cmp`), merged.mtz (and the unmerged MTZ) column by column exactly (gemmi, not our reader),
the JSON's scaling, merging and model-curve sections equal. Quartz (1620 rows, dials.scale's
integrated data) is one key block: at N = 2 rank 0 holds no row; cut by equal numbers of keys
at N = 3 its rows (and its 60 outliers) interleave over the ranks. The 3-sweep simulation
(~21 000 rows) is cut into 4 key blocks; small windows make several gathers per column.
A failure on one rank while the file is written leaves no file at all, on either rank.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mpi_helpers
from mpi_helpers import launcher, rows_per_rank

pytest.importorskip("mpi4py")
gemmi = pytest.importorskip("gemmi")

HERE = os.path.dirname(__file__)
QUARTZ = os.path.join(HERE, "data", "dials", "quartz_processed")
DRIVER = os.path.join(HERE, "rank_local_outputs_driver.py")
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{name: (directory of the one-process dials.vmerge run, its extra arguments)}."""
    out = {}
    d = tmp_path_factory.mktemp("quartz_one")
    done = mpi_helpers.run(["dials.vmerge", os.path.join(QUARTZ, "integrated.expt"),
                            os.path.join(QUARTZ, "integrated.refl")], d, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    out["quartz"] = (d, [])
    d = tmp_path_factory.mktemp("sweeps3_one")
    done = mpi_helpers.run(["dials.vmerge.simulate", "rotation.n_sweeps=3",
                            "n_obs_target=20000", "seed=5"], d, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    extra = ["nproc=1", "unmerged_mtz=unmerged.mtz"]
    done = mpi_helpers.run(["dials.vmerge", "simulated.expt", "simulated.refl"] + extra, d,
                           timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    out["sweeps3"] = (d, extra)
    return out


def run_driver(reference, extra, cwd, n_ranks, **env):
    environment = dict(os.environ, RANK_LOCAL_REFERENCE=str(reference),
                       **{k: str(v) for k, v in env.items()})
    command = [sys.executable, DRIVER, str(reference / "scaled.expt"),
               str(reference / "scaled.refl")] + extra
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=environment)


def mtz_columns(path):
    mtz = gemmi.read_mtz_file(str(path))
    hkl = np.array(mtz.make_miller_array(), dtype=np.int64)
    return hkl, {c.label: np.array(c, dtype=np.float64) for c in mtz.columns}


CASES = [
    # name, ranks, driver environment, what the partition looks like
    ("quartz", None, {}, "one process: the ordinary writer (the driver's control)"),
    ("quartz", 2, {}, "one key block: rank 0 holds no row"),
    ("quartz", 3, {"RANK_LOCAL_EVEN_KEYS": 1, "RANK_LOCAL_WINDOW_ROWS": 500},
     "rows and outliers interleaved over three ranks, four windows"),
    ("sweeps3", 2, {"RANK_LOCAL_WINDOW_ROWS": 3000}, "key blocks, seven windows"),
    ("sweeps3", 3, {"RANK_LOCAL_WINDOW_ROWS": 3000}, "key blocks, seven windows"),
    ("sweeps3", 2, {"RANK_LOCAL_ALL_ON_RANK": 1}, "every row on rank 1"),
]


@pytest.mark.parametrize("name,n_ranks,env,what", CASES,
                         ids=[f"{c[0]}-{c[1] or 1}-{'-'.join(c[2]) or 'blocks'}" for c in CASES])
def test_rank_local_outputs_equal_one_process(references, tmp_path, name, n_ranks, env, what):
    reference, extra = references[name]
    done = run_driver(reference, extra, tmp_path, n_ranks, **env)
    assert done.returncode == 0, done.stderr
    held = rows_per_rank(tmp_path / "dials.vmerge.log")
    if n_ranks is None:
        assert held is None
    else:
        # the merge ran on the rows each rank was given, not on a second partition
        counts, total = held
        assert len(counts) == n_ranks and sum(counts) == total
        if name == "quartz" and not env:
            assert 0 in counts
        if "RANK_LOCAL_ALL_ON_RANK" in env:
            assert counts == [0, total]
        if "RANK_LOCAL_EVEN_KEYS" in env:
            assert all(c > 0 for c in counts)
    for file_name in ("scaled.refl", "scaled.expt"):
        assert (tmp_path / file_name).read_bytes() == (reference / file_name).read_bytes(), \
            file_name
    for file_name in ["merged.mtz"] + (["unmerged.mtz"] if "unmerged_mtz=unmerged.mtz" in extra
                                       else []):
        hkl, columns = mtz_columns(tmp_path / file_name)
        hkl_ref, columns_ref = mtz_columns(reference / file_name)
        assert np.array_equal(hkl, hkl_ref), file_name
        assert sorted(columns) == sorted(columns_ref), file_name
        for label, values in columns_ref.items():
            # the same values in the same order per group: the same bits
            assert np.array_equal(columns[label], values, equal_nan=True), (file_name, label)
    report = json.loads((tmp_path / "dials.vmerge.json").read_text())
    report_ref = json.loads((reference / "dials.vmerge.json").read_text())
    assert sorted(report) == sorted(report_ref)
    for section in ("scaling", "scaling_models"):
        assert report[section] == report_ref[section], section
    for key, value in report_ref["merging"].items():
        assert report["merging"][key] == value, key
    if name == "quartz":  # the outliers' summary really has points (from every rank)
        assert report["merging"]["diagnostics"]["outliers"]["n"] == 60


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_failure_on_one_rank_while_writing_leaves_nothing(references, tmp_path, failing_rank):
    """Rank `failing_rank` raises in the third column of scaled.refl (rank 0 has written the
    header and two columns): every rank stops with the one line, exit 1, and the output
    directory holds nothing, not even a temporary file; within seconds (no abort timeout)."""
    reference, extra = references["quartz"]
    done = run_driver(reference, extra, tmp_path, 2, RANK_LOCAL_FAIL_RANK=failing_rank,
                      RANK_LOCAL_EVEN_KEYS=1)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["dials.vmerge: error: injected failure while writing scaled.refl"]
    assert os.listdir(tmp_path) == []


WRITE_DRIVER = os.path.join(HERE, "rank_local_write_driver.py")


@pytest.mark.parametrize("n_ranks,case", [(2, "random"), (3, "random"), (3, "empty"),
                                          (3, "one_rank"), (3, "unsorted"),
                                          (3, "duplicate")])
def test_writer_on_synthetic_partitions(tmp_path, n_ranks, case):
    """The writer alone on a 101-row table of every column type (bool, int, size_t, int6,
    vec2/vec3/mat3, Miller index), rows dealt to the ranks at random (every 7-row window
    interleaves them), none at all, or all on the last rank: rank 0's file is byte for byte
    encode_reflections of the whole table (checked in the driver). Keys not ascending on a
    rank, or shared by two ranks: every rank raises the same internal error (no hang, no
    file)."""
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    results.mkdir()
    done = subprocess.run([launcher(), "-n", str(n_ranks), sys.executable, WRITE_DRIVER,
                           str(out), case, str(results)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(results)) == [f"rank{r}.txt" for r in range(n_ranks)]
    lines = sorted((results / f"rank{r}.txt").read_text().strip() for r in range(n_ranks))
    if case in ("unsorted", "duplicate"):
        assert len(set(lines)) == 1 and lines[0].startswith("error: internal error"), lines
        assert "not strictly ascending" in lines[0] if case == "unsorted" else \
            "same output_order_key" in lines[0]
        assert os.listdir(out) == []
        return
    held = [int(line.split()[1]) for line in lines if line.startswith("ok ")]
    assert len(held) == n_ranks and sum(held) == (0 if case == "empty" else 101), lines
    if case == "one_rank":
        assert sorted(held) == [0] * (n_ranks - 1) + [101]
    assert os.listdir(out) == ["out.refl"]


def test_empty_table_with_shaped_columns_round_trips(tmp_path):
    """io.refl's writer on a table with no row and vec3 / Miller index columns (it failed:
    memoryview cannot cast a (0, 3) array's view); read back: no row, same types."""
    from dials_vmerge.io import read_reflections, write_reflections
    from dials_vmerge.io.refl import decode_reflections, encode_reflections
    from dials_vmerge.table import ReflectionTable

    table = ReflectionTable(0, {0: "x"})
    table.set_column("miller_index", np.zeros((0, 3), np.int32))
    table.set_column("xyzobs.px.value", np.zeros((0, 3)))
    table.set_column("d", np.zeros(0))
    table.set_column("id", np.zeros(0, np.int32))
    raw = encode_reflections(table)
    back = decode_reflections(raw)
    assert back.nrows == 0 and sorted(back.keys()) == sorted(table.keys())
    assert back.column_type("xyzobs.px.value") == "vec3<double>"
    write_reflections(table, str(tmp_path / "empty.refl"))
    assert (tmp_path / "empty.refl").read_bytes() == raw
    assert read_reflections(str(tmp_path / "empty.refl")).nrows == 0
