"""Running the installed programs under the `mpi` extra's launcher, and comparing their logs
with a one-process run's (tests/test_mpi_runs.py, tests/test_mpi_merge_rank_rows.py,
tests/test_mpi_stats_rank_rows.py)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
# progress.stage's line, logged only when a stage was slow: absent or present run by run
STAGE_TIME = re.compile(r"[A-Za-z][\w ()/,.-]*: (\d+ in )?\d+\.\d s")
# merging/rank_merge.py's line when a merge ran on each rank's own rows
RANK_ROWS = re.compile(r"MPI: merging each rank's own unique reflections \(rows per rank "
                       r"([\d / ]+) of (\d+)\)")


def rows_per_rank(log_path):
    """(rows held by each rank, rows in all) from a log's rank-rows line, or None when the
    merge did not run on the ranks' own rows."""
    match = RANK_ROWS.search(open(log_path).read())
    if match is None:
        return None
    return [int(n) for n in match.group(1).split(" / ")], int(match.group(2))


def launcher():
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
        if path:
            return path
    pytest.skip("no mpiexec on PATH (install the `mpi` extra)")


def program(name):
    return os.path.join(BIN, name)


def run(args, cwd, n_ranks=None, env=None, timeout_s=240):
    """args[0] is the program's name; n_ranks None: one process without a launcher."""
    command = [program(args[0])] + list(args[1:])
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env=env)


def one_process_and_ranks(args, tmp_path, n_ranks=2, timeout_s=240):
    """Output directories of `args` run as one process and under n_ranks ranks (both must
    succeed)."""
    one, many = tmp_path / "one", tmp_path / f"ranks{n_ranks}"
    one.mkdir()
    many.mkdir()
    assert run(args, cwd=one, timeout_s=timeout_s).returncode == 0
    done = run(args, cwd=many, n_ranks=n_ranks, timeout_s=timeout_s)
    assert done.returncode == 0, done.stderr
    return one, many


def comparable_log(path):
    """The log without the lines that legitimately differ: timings, the command, MPI's."""
    keep = []
    for line in open(path).read().splitlines():
        if "time" in line.lower() or line.startswith(("Command line", "MPI:")):
            continue
        if STAGE_TIME.fullmatch(line):
            continue
        keep.append(line)
    return keep


# The two simulations the rank-local test files scale (3 sweeps of a rotation, 200 KB stills),
# made once per test session (conftest.py's rank_local_simulations).
RANK_LOCAL_SIMULATIONS = {
    "sweeps3": ["rotation.n_sweeps=3", "n_obs_target=45000", "noise.outlier_fraction=0.01",
                "seed=5"],
    "stills200": ["mode=stills", "stills.n_images=200", "model=KB", "crystal.d_min=6",
                  "seed=4"],
}


def simulated_inputs(root, simulations, timeout_s=300):
    """{name: (simulated.expt, simulated.refl)}: dials.vmerge.simulate with each name's
    arguments, in root/name."""
    out = {}
    for name, args in simulations.items():
        directory = root / name
        directory.mkdir()
        done = run(["dials.vmerge.simulate"] + list(args), cwd=directory, timeout_s=timeout_s)
        assert done.returncode == 0, done.stderr
        out[name] = (str(directory / "simulated.expt"), str(directory / "simulated.refl"))
    return out


def runs_at_one_two_three(args, tmp_path, timeout_s=300):
    """{None, 2, 3: output directory} of `args` run as one process and at 2 and 3 ranks."""
    runs = {}
    for n_ranks in (None, 2, 3):
        directory = tmp_path / f"ranks{n_ranks}"
        directory.mkdir()
        done = run(args, cwd=directory, n_ranks=n_ranks, timeout_s=timeout_s)
        assert done.returncode == 0, done.stderr
        runs[n_ranks] = directory
    return runs


def assert_same_files_and_log(one, many, outputs, n_ranks):
    """`outputs` byte-identical in directories one and many, and their dials.vmerge.log equal
    apart from timings and MPI lines."""
    for output in outputs:
        assert (one / output).read_bytes() == (many / output).read_bytes(), (n_ranks, output)
    assert (comparable_log(one / "dials.vmerge.log")
            == comparable_log(many / "dials.vmerge.log")), n_ranks
