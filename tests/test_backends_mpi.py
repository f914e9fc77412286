"""Splitting work over MPI ranks (backends/block_sums.py shard_bounds) and one real two-rank
run of the block-summed scaling target against a numpy recomputation.

The pickle-based sharding helpers these tests once covered were replaced by the block sums
and backends/mpi_world.py; what remains is the balanced split and a run under the `mpi`
extra's own mpiexec (found beside the interpreter, as tests/test_mpi_runs.py does, so CI
runs it).
"""

import os
import shutil
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.backends.block_sums import shard_bounds

N_PARAMS = 9
BIN = os.path.dirname(sys.executable)


def random_problem(seed=5, n_groups=4000):
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(1, 15, n_groups)
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n = int(group_start[-1])
    return (rng.exponential(300.0, n), rng.uniform(0.2, 3.0, n), rng.uniform(0.5, 1.5, n),
            rng.normal(0.0, 1.0, (n, 4)), rng.integers(-1, N_PARAMS, (n, 4)).astype(np.int32),
            group_start)


def numpy_target(intensity, weight, g, deriv_values, deriv_index, group_start):
    """sum w r^2 and its gradient, written independently of the kernels (dials-scaling.md
    5.2), and the scale of the gradient's terms for a relative tolerance."""
    grp = np.repeat(np.arange(group_start.size - 1), np.diff(group_start))
    ih = np.bincount(grp, weight * g * intensity) / np.bincount(grp, weight * g * g)
    r = intensity - g * ih[grp]
    factor = -2.0 * weight * r * ih[grp]
    used = deriv_index >= 0
    terms = (factor[:, None] * deriv_values)[used]
    return (float(np.sum(weight * r * r)),
            np.bincount(deriv_index[used], terms, minlength=N_PARAMS),
            np.bincount(deriv_index[used], np.abs(terms), minlength=N_PARAMS))


def test_hand_computed_bounds():
    # sizes 3,1,1,3: the half-way target 4 is a group boundary -> 4 + 4 observations
    assert shard_bounds(np.array([0, 3, 4, 5, 8]), 2).tolist() == [0, 2, 4]
    # sizes 5,1,1,1: target 4 lies inside group 0; boundary 5 is nearer than 0
    assert shard_bounds(np.array([0, 5, 6, 7, 8]), 2).tolist() == [0, 1, 4]
    # more ranks than groups (targets 1, 2, 3 on boundaries 0, 2, 4; a tie goes to the lower
    # boundary): ranks 0 and 2 own nothing, every group is owned once
    assert shard_bounds(np.array([0, 2, 4]), 4).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 7, 16, 450])
def test_bounds_cover_every_group_once_contiguously_and_balanced(n_ranks):
    group_start = random_problem(n_groups=400)[-1]
    n_groups, n_obs = group_start.size - 1, int(group_start[-1])
    largest_group = int(np.max(np.diff(group_start)))
    bounds = shard_bounds(group_start, n_ranks)
    assert bounds.size == n_ranks + 1 and bounds[0] == 0 and bounds[-1] == n_groups
    assert np.all(np.diff(bounds) >= 0)
    per_rank = np.diff(group_start[bounds])
    assert per_rank.sum() == n_obs
    assert np.all(np.abs(per_rank - n_obs / n_ranks) <= largest_group)
    assert np.array_equal(shard_bounds(group_start, n_ranks), bounds)


def test_bad_rank_count_is_rejected():
    with pytest.raises(ValueError, match="n_ranks"):
        shard_bounds(np.array([0, 2]), 0)


def test_real_mpi_target_equals_one_process_and_numpy(tmp_path):
    # Two real ranks each evaluate their own blocks and exchange tree nodes (Allgatherv):
    # both ranks must hold the bits of the one-process evaluation, which agrees with numpy.
    pytest.importorskip("mpi4py")
    launcher = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if launcher is None:
        pytest.skip("no mpiexec beside the interpreter or on PATH (install the `mpi` extra)")
    problem = random_problem()
    inputs = tmp_path / "problem.npz"
    np.savez(inputs, *problem)
    code = (
        "import sys\n"
        "import dials_vmerge\n"
        "import numpy as np\n"
        "from dials_vmerge.backends import mpi_world\n"
        "from dials_vmerge.scaling.target import RankShare, normal_equations, target_and_gradient\n"
        "d = np.load(sys.argv[1])\n"
        "args = [d[f'arr_{i}'] for i in range(6)]\n"
        "r = mpi_world.rank()\n"
        f"phi, grad = target_and_gradient(*args, {N_PARAMS})\n"
        "np.save(sys.argv[2] + f'.{r}.npy', np.concatenate([[phi], grad]))\n"
        "np.save(sys.argv[2] + f'.ranks{r}.npy', [mpi_world.n_ranks()])\n"
        # the same sums from each rank's own rows only (RankShare)
        f"share = RankShare(args[5], {N_PARAMS})\n"
        "own = [share.rows(a) for a in args[:5]]\n"
        f"phi, grad = target_and_gradient(*own, args[5], {N_PARAMS}, share=share)\n"
        f"phi_n, rhs, normal = normal_equations(*own, args[5], {N_PARAMS}, share=share)\n"
        "np.save(sys.argv[2] + f'.share{r}.npy', np.concatenate([[phi, phi_n], grad, rhs,"
        " normal.ravel(), [share.obs_lo, share.obs_hi]]))\n"
    )
    out = str(tmp_path / "result")
    run = subprocess.run([launcher, "-n", "2", sys.executable, "-c", code, str(inputs), out],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.load(out + ".ranks0.npy").tolist() == [2]
    rank0, rank1 = np.load(out + ".0.npy"), np.load(out + ".1.npy")
    assert np.array_equal(rank0, rank1)
    from dials_vmerge.scaling.target import normal_equations, target_and_gradient

    phi_one, grad_one = target_and_gradient(*problem, N_PARAMS)
    assert rank0[0] == phi_one and np.array_equal(rank0[1:], grad_one)
    # from each rank's own rows: the one-process bits, and the ranks' rows split the table
    phi_n, rhs_one, normal_one = normal_equations(*problem, N_PARAMS)
    expected = np.concatenate([[phi_one, phi_n], grad_one, rhs_one, normal_one.ravel()])
    share0, share1 = np.load(out + ".share0.npy"), np.load(out + ".share1.npy")
    assert np.array_equal(share0[:-2], expected) and np.array_equal(share1[:-2], expected)
    n_obs = problem[-1][-1]
    assert share0[-2:].tolist() == [0, share1[-2]] and share1[-1] == n_obs
    assert 0.3 * n_obs < share1[-2] < 0.7 * n_obs  # each rank evaluated about half the rows
    phi_ref, grad_ref, scale = numpy_target(*problem)
    assert abs(rank0[0] - phi_ref) <= 1e-12 * phi_ref
    assert np.all(np.abs(rank0[1:] - grad_ref) <= 1e-12 * scale)
    assert np.max(np.abs(grad_ref)) > 1.0
