"""Sharding groups over MPI ranks and the rank-ordered sum of partial targets, without MPI.

The ranks are threads joined by a fake communicator with mpi4py's pickle-style gather/bcast
semantics, so the collective code runs exactly as it would under mpiexec.
"""

import sys
import threading

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.backends import mpi
from dials_vmerge.errors import VmergeError
from dials_vmerge.scaling.target import target_and_gradient

N_PARAMS = 9


class ThreadComm:
    """One rank's view of a communicator shared by n_ranks threads."""

    def __init__(self, rank, shared):
        self.rank = rank
        self.shared = shared

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.shared["size"]

    def gather(self, obj, root=0):
        self.shared["slots"][self.rank] = obj
        self.shared["barrier"].wait()
        result = list(self.shared["slots"]) if self.rank == root else None
        self.shared["barrier"].wait()  # nobody overwrites a slot before root has read it
        return result

    def bcast(self, obj, root=0):
        if self.rank == root:
            self.shared["bcast"] = obj
        self.shared["barrier"].wait()
        result = self.shared["bcast"]
        self.shared["barrier"].wait()
        return result


def run_ranks(n_ranks, job):
    """job(comm) on n_ranks threads; the list of their return values in rank order."""
    shared = {"size": n_ranks, "slots": [None] * n_ranks, "bcast": None,
              "barrier": threading.Barrier(n_ranks, timeout=30)}
    results, errors = [None] * n_ranks, []

    def work(rank):
        try:
            results[rank] = job(ThreadComm(rank, shared))
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# numba's workqueue layer must not launch parallel kernels from two threads at once;
# real ranks are processes, so serialising the fake ranks' local work changes nothing.
_kernel_lock = threading.Lock()


def locked_cpu_target(*args):
    with _kernel_lock:
        return target_and_gradient(*args)


def random_problem(seed=5, n_groups=400):
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(1, 15, n_groups)
    group_start = np.concatenate([[0], np.cumsum(multiplicity)]).astype(np.int64)
    n = int(group_start[-1])
    return (rng.exponential(300.0, n), rng.uniform(0.2, 3.0, n), rng.uniform(0.5, 1.5, n),
            rng.normal(0.0, 1.0, (n, 4)), rng.integers(-1, N_PARAMS, (n, 4)).astype(np.int32),
            group_start)


def numpy_target(intensity, weight, g, deriv_values, deriv_index, group_start):
    grp = np.repeat(np.arange(group_start.size - 1), np.diff(group_start))
    ih = np.bincount(grp, weight * g * intensity) / np.bincount(grp, weight * g * g)
    r = intensity - g * ih[grp]
    factor = -2.0 * weight * r * ih[grp]
    used = deriv_index >= 0
    terms = (factor[:, None] * deriv_values)[used]
    return (float(np.sum(weight * r * r)),
            np.bincount(deriv_index[used], terms, minlength=N_PARAMS),
            np.bincount(deriv_index[used], np.abs(terms), minlength=N_PARAMS))


def test_hand_computed_shards():
    # sizes 3,1,1,3: the half-way target 4 is a group boundary -> 4 + 4 observations
    group_start = np.array([0, 3, 4, 5, 8])
    assert mpi.shard_groups(group_start, 2, 0) == (slice(0, 4), slice(0, 2))
    assert mpi.shard_groups(group_start, 2, 1) == (slice(4, 8), slice(2, 4))
    # sizes 5,1,1,1: target 4 lies inside group 0; boundary 5 is nearer than 0
    group_start = np.array([0, 5, 6, 7, 8])
    assert mpi.shard_groups(group_start, 2, 0) == (slice(0, 5), slice(0, 1))
    assert mpi.shard_groups(group_start, 2, 1) == (slice(5, 8), slice(1, 4))
    assert mpi.shard_arrays(group_start, slice(1, 4)).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 7, 16, 450])
def test_shards_cover_every_group_once_contiguously_and_balanced(n_ranks):
    group_start = random_problem()[-1]
    n_groups, n_obs = group_start.size - 1, int(group_start[-1])
    largest_group = int(np.max(np.diff(group_start)))
    shards = [mpi.shard_groups(group_start, n_ranks, r) for r in range(n_ranks)]
    owner = np.concatenate([np.arange(gs.start, gs.stop) for _, gs in shards])
    assert owner.tolist() == list(range(n_groups))  # each group once, in rank order
    next_obs = 0
    for obs, groups in shards:
        assert obs.start == next_obs == group_start[groups.start]  # contiguous, whole groups
        assert obs.stop == group_start[groups.stop]
        next_obs = obs.stop
        assert abs((obs.stop - obs.start) - n_obs / n_ranks) <= largest_group
    assert next_obs == n_obs
    again = [mpi.shard_groups(group_start, n_ranks, r) for r in range(n_ranks)]
    assert again == shards


def test_bad_rank_is_rejected():
    with pytest.raises(ValueError):
        mpi.shard_groups(np.array([0, 2]), 2, 2)


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 5])
def test_sharded_target_equals_unsharded(n_ranks):
    problem = random_problem()
    phi_ref, grad_ref, scale = numpy_target(*problem)
    phi_cpu, grad_cpu = target_and_gradient(*problem, N_PARAMS)

    def job(comm):
        return mpi.sharded_target_and_gradient(*problem, N_PARAMS, comm,
                                               evaluate=locked_cpu_target)

    results = run_ranks(n_ranks, job)
    phi, grad = results[0]
    for other_phi, other_grad in results[1:]:  # every rank holds the same bits
        assert other_phi == phi and np.array_equal(other_grad, grad)
    for phi_expected, grad_expected in ((phi_ref, grad_ref), (phi_cpu, grad_cpu)):
        assert abs(phi - phi_expected) <= 1e-12 * phi_expected
        assert np.all(np.abs(grad - grad_expected) <= 1e-12 * scale)
    assert np.max(np.abs(grad_ref)) > 1.0
    rerun = run_ranks(n_ranks, job)[0]
    assert rerun[0] == phi and np.array_equal(rerun[1], grad)


def test_allreduce_adds_in_rank_order():
    # In rank order (((1e16 + 1) - 1e16) + 1) = 1 (1e16 + 1 rounds to 1e16); a pairwise tree
    # gives (1e16 + 1) + (-1e16 + 1) = 0 and an exact sum 2, so only rank order passes.
    phis = [1e16, 1.0, -1e16, 1.0]

    def job(comm):
        r = comm.Get_rank()
        return mpi.allreduce_target(phis[r], np.array([phis[r], float(r)]), comm)

    results = run_ranks(4, job)
    for phi, grad in results:
        assert phi == 1.0
        assert grad.tolist() == [1.0, 6.0]


def test_allreduce_without_comm_is_identity():
    phi, grad = mpi.allreduce_target(3.5, np.array([1.0, 2.0]), None)
    assert phi == 3.5 and grad.tolist() == [1.0, 2.0]


def test_missing_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import now raises ImportError
    with pytest.raises(VmergeError, match="mpi4py is not installed"):
        mpi.world_comm()


def test_real_mpi_run_matches_unsharded(tmp_path):
    # Only where mpi4py and a launcher are installed (the `mpi` extra); the fake-comm tests
    # above cover the logic everywhere else.
    import shutil
    import subprocess

    pytest.importorskip("mpi4py")
    launcher = shutil.which("mpiexec") or shutil.which("mpirun")
    if launcher is None:
        pytest.skip("no mpiexec/mpirun on PATH")
    problem = random_problem()
    inputs = tmp_path / "problem.npz"
    np.savez(inputs, *problem)
    code = (
        "import sys\n"
        "import dials_vmerge\n"
        "import numpy as np\n"
        "from dials_vmerge.backends import mpi\n"
        "comm = mpi.world_comm()\n"
        "d = np.load(sys.argv[1])\n"
        "args = [d[f'arr_{i}'] for i in range(6)]\n"
        f"phi, grad = mpi.sharded_target_and_gradient(*args, {N_PARAMS}, comm)\n"
        "np.save(sys.argv[2] + f'.{comm.Get_rank()}.npy', np.concatenate([[phi], grad]))\n"
    )
    out = str(tmp_path / "result")
    run = subprocess.run([launcher, "-n", "2", sys.executable, "-c", code, str(inputs), out],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rank0, rank1 = np.load(out + ".0.npy"), np.load(out + ".1.npy")
    assert np.array_equal(rank0, rank1)
    phi_ref, grad_ref, scale = numpy_target(*problem)
    assert abs(rank0[0] - phi_ref) <= 1e-12 * phi_ref
    assert np.all(np.abs(rank0[1:] - grad_ref) <= 1e-12 * scale)
