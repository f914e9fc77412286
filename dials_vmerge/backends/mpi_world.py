"""Running every program under `mpiexec -n N` (or `srun -n N`): the MPI world of one run.

Layout (what is distributed and what is not, honestly):
- Every rank reads the whole input and runs the same straight-line job; all decisions are
  taken from values that are bit-identical on every rank, so the ranks stay in lock step.
- The per-observation work of the minimiser (target and gradient, normal matrix) is split by
  unique reflection: the groups are cut into fixed blocks that depend on the data only, each
  rank evaluates a contiguous range of whole blocks, balanced by observation count, and the
  block partials are added as a tree over the blocks whose nodes the ranks exchange with one
  buffer-based Allgatherv (backends/block_sums.py, gather_tree_nodes). Any N (and any nproc)
  therefore gives the same bits as one process. Restraints are added once, after the
  reduction, by the caller.
- Outputs (files and the log) are written by rank 0 only, atomically; the other ranks' writes
  go to private temporary files that are discarded (io.atomic asks `is_output_rank`).
- A failure on any rank stops all ranks: ranks that fail together (bad input: every rank
  reads the same files and parameters) meet on a separate communicator, rank 0 prints the
  one-line error and all exit 1; a rank that fails alone prints its line and calls Abort.

Without MPI environment variables (no mpiexec/srun, or one rank) nothing here imports mpi4py
and every function is the single-process identity.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from ..errors import VmergeError

# Launchers say how many ranks there are before MPI is initialised: hydra/PMI (MPICH, srun
# with PMI2), PMIx (srun --mpi=pmix, OpenMPI 5) and OpenMPI's own variable.
_SIZE_VARIABLES = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")

_state = {"comm": None, "error_comm": None, "commit_comm": None, "private_dir": None, "checked": False, "comm_seconds": 0.0,
          "reductions": 0, "reduced_bytes": 0}


def launched_ranks() -> int:
    """Number of ranks the launcher started (1 when not under a launcher)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def world():
    """MPI.COMM_WORLD when running under a launcher with more than one rank, else None."""
    if not _state["checked"]:
        _state["checked"] = True
        if launched_ranks() > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise VmergeError(
                    f"started with {launched_ranks()} MPI ranks but mpi4py is not installed "
                    "(pip install 'dials-vmerge[mpi]')") from None
            comm = MPI.COMM_WORLD
            if comm.Get_size() > 1:
                _state["comm"] = comm
                # Errors meet here, never on COMM_WORLD where healthy ranks wait in reductions.
                _state["error_comm"] = comm.Dup()
                _state["commit_comm"] = comm.Dup()
                # mpiexec stops the surviving ranks with SIGTERM when one rank dies: leave
                # through the normal unwinding so staged temporary outputs are removed.
                signal.signal(signal.SIGTERM, _exit_on_signal)
                # an uncaught exception (--debug) must not leave the other ranks waiting
                sys.excepthook = _abort_after_traceback
    return _state["comm"]


def _abort(code=1):
    """MPI_Abort once the launcher has had time to forward this rank's last lines (an abort
    kills the forwarding proxy too, which otherwise cuts the message short)."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(1.0)
    _state["comm"].Abort(code)


def _abort_after_traceback(kind, value, traceback):
    sys.__excepthook__(kind, value, traceback)
    _abort(1)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def rank() -> int:
    comm = world()
    return 0 if comm is None else comm.Get_rank()


def n_ranks() -> int:
    comm = world()
    return 1 if comm is None else comm.Get_size()


def is_output_rank() -> bool:
    """True on the one rank that writes files and the log (rank 0; always in one process)."""
    return rank() == 0


def private_output_dir():
    """A directory of this rank's own (removed at exit) where a rank other than 0 writes the
    outputs it computes but never publishes; None on rank 0 and in one process."""
    if world() is None or is_output_rank():
        return None
    if _state["private_dir"] is None:
        import atexit
        import shutil
        import tempfile

        _state["private_dir"] = tempfile.mkdtemp(prefix=f"dials_vmerge_rank{rank()}_")
        atexit.register(shutil.rmtree, _state["private_dir"], True)
    return _state["private_dir"]


def agree_to_publish() -> None:
    """Called by every rank before each atomic rename: a barrier on a communicator of its own,
    so no file is published while another rank has failed (it aborts the job instead)."""
    if world() is not None:
        _wait(_state["commit_comm"].Ibarrier())


def _wait(request) -> None:
    """Complete a non-blocking collective, returning to the interpreter between tests: a
    rank blocked in a C-level MPI wait would not run its SIGTERM handler when mpiexec stops
    the job after another rank died, and its temporary outputs (the streamed log's .part)
    would stay behind."""
    spins = 0
    while not request.Test():
        spins += 1
        if spins > 100:
            time.sleep(1e-4)  # after a short spin, give the core to the ranks still computing


def sum_over_ranks(*values):
    """Each value (a float or a numpy array) summed over all ranks, identical bits on every
    rank: one Allgather of the packed partials, then a sum in rank order."""
    comm = world()
    if comm is None:
        return values if len(values) > 1 else values[0]
    start = time.perf_counter()
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    packed = np.concatenate([a.ravel() for a in arrays])
    gathered = np.empty((comm.Get_size(), packed.size), dtype=np.float64)
    _wait(comm.Iallgather(packed, gathered))
    total = gathered[0].copy()
    for row in gathered[1:]:
        total += row
    out, offset = [], 0
    for a, v in zip(arrays, values):
        part = total[offset:offset + a.size].reshape(a.shape)
        offset += a.size
        out.append(float(part) if np.ndim(v) == 0 else part)
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 1
    _state["reduced_bytes"] += packed.nbytes
    return tuple(out) if len(out) > 1 else out[0]


def gather_tree_nodes(own_nodes, block_ranges, shapes, canonical_nodes):
    """Every rank's tree nodes of a block sum (backends/block_sums.py), on every rank.

    own_nodes: {(level, index): [arrays of `shapes`]} of this rank's blocks; block_ranges:
    block offsets of all ranks, from which every rank knows every rank's node list, so one
    Allgatherv of the packed float64 values is the whole exchange."""
    from mpi4py import MPI

    comm = world()
    start = time.perf_counter()
    per_node = int(sum(int(np.prod(s)) for s in shapes))
    node_lists = [canonical_nodes(int(block_ranges[r]), int(block_ranges[r + 1]))
                  for r in range(comm.Get_size())]
    mine = node_lists[comm.Get_rank()]
    packed = np.empty(len(mine) * per_node, dtype=np.float64)
    offset = 0
    for node in mine:
        for value in own_nodes[node]:
            flat = np.asarray(value, dtype=np.float64).ravel()
            packed[offset:offset + flat.size] = flat
            offset += flat.size
    counts = np.array([len(nodes) * per_node for nodes in node_lists], dtype=np.int64)
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    gathered = np.empty(int(counts.sum()), dtype=np.float64)
    _wait(comm.Iallgatherv(packed, [gathered, (counts, displacements), MPI.DOUBLE]))
    nodes, offset = {}, 0
    for node_list in node_lists:
        for node in node_list:
            values = []
            for s in shapes:
                size = int(np.prod(s))
                values.append(gathered[offset:offset + size].reshape(s))
                offset += size
            nodes[node] = values
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 1
    _state["reduced_bytes"] += packed.nbytes
    return nodes


def communication_stats() -> dict:
    """Seconds spent in reductions, their number and bytes sent per rank (for benchmarks)."""
    return {"seconds": _state["comm_seconds"], "reductions": _state["reductions"],
            "bytes_per_rank": _state["reduced_bytes"]}


def summary() -> str:
    """One log line: ranks and the time rank 0 spent in reductions."""
    stats = communication_stats()
    return (f"MPI: {n_ranks()} ranks; {stats['reductions']} reductions of "
            f"{stats['bytes_per_rank'] / 1e6:.3f} MB per rank in {stats['seconds']:.3f} s")


def silence_non_output_ranks() -> None:
    """Only rank 0 talks: the other ranks' stdout goes to /dev/null."""
    if world() is not None and not is_output_rank():
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")


def stop_after_error(line: str, wait_seconds: float = 20.0) -> int:
    """Called by a rank that failed with the one-line message `line`.

    If every rank fails (the usual case: each read the same bad input) they meet on the error
    communicator within wait_seconds: rank 0 prints the line, everyone returns 1. A rank whose
    partners do not arrive failed alone: it prints its line and aborts the whole job, so no
    rank hangs in a reduction. In one process: print and return 1."""
    comm = world()
    if comm is None:
        print(line, file=sys.stderr)
        return 1
    request = _state["error_comm"].Ibarrier()
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if request.Test():
            if is_output_rank():
                print(line, file=sys.stderr)
            sys.stderr.flush()
            return 1
        time.sleep(0.01)
    print(f"{line} (MPI rank {rank()} of {n_ranks()}; stopping all ranks)", file=sys.stderr)
    _abort(1)
    return 1  # not reached


def report() -> dict:
    """MPI library, ranks and hosts of this run (for dials.vmerge.devices)."""
    out = {"mpi_ranks": n_ranks(), "mpi_library": None, "mpi_hosts": []}
    try:
        from mpi4py import MPI
    except ImportError:
        return out
    out["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
    comm = world()
    host = MPI.Get_processor_name()
    hosts = [host] if comm is None else comm.allgather(host)
    out["mpi_hosts"] = sorted(set(hosts))
    return out


# -- row exchanges for programs whose ranks hold their own rows (merging/rank_merge.py) -------
def _byte_counts(values, comm):
    """(values as a contiguous C array, its bytes, every rank's bytes) for a v-collective of
    whole rows: rows of equal shape and dtype on every rank (the caller guarantees it)."""
    values = np.ascontiguousarray(values)
    counts = np.array(comm.allgather(int(values.nbytes)), dtype=np.int64)
    return values, counts


def allgather_rows(values):
    """Every rank's rows of `values` (same trailing shape and dtype on all ranks),
    concatenated in rank order, on every rank: one buffer Allgatherv of the raw bytes. In
    one process: `values` itself."""
    comm = world()
    if comm is None:
        return np.asarray(values)
    from mpi4py import MPI

    start = time.perf_counter()
    values, counts = _byte_counts(values, comm)
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    gathered = np.empty(int(counts.sum()), dtype=np.uint8)
    _wait(comm.Iallgatherv(values.view(np.uint8).ravel(),
                           [gathered, (counts, displacements), MPI.BYTE]))
    row_shape = values.shape[1:]
    out = gathered.view(values.dtype).reshape((-1,) + row_shape)
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 1
    _state["reduced_bytes"] += values.nbytes
    return out


def gather_rows_to_output_rank(values):
    """Every rank's rows of `values` concatenated in rank order on rank 0 (one buffer
    Gatherv of the raw bytes); the other ranks get their own rows back. In one process:
    `values` itself."""
    comm = world()
    if comm is None:
        return np.asarray(values)
    from mpi4py import MPI

    start = time.perf_counter()
    values, counts = _byte_counts(values, comm)
    send = values.view(np.uint8).ravel()
    if is_output_rank():
        displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        gathered = np.empty(int(counts.sum()), dtype=np.uint8)
        _wait(comm.Igatherv(send, [gathered, (counts, displacements), MPI.BYTE], root=0))
        out = gathered.view(values.dtype).reshape((-1,) + values.shape[1:])
    else:
        _wait(comm.Igatherv(send, None, root=0))
        out = values
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 1
    _state["reduced_bytes"] += values.nbytes
    return out


def broadcast_from_output_rank(values, dtype):
    """Rank 0's 1-d array `values` (of `dtype`; ignored on the other ranks) on every rank:
    a buffer Bcast of its length, then of its bytes. In one process: `values` itself."""
    comm = world()
    if comm is None:
        return np.asarray(values, dtype=dtype)
    start = time.perf_counter()
    length = np.zeros(1, dtype=np.int64)
    if is_output_rank():
        values = np.ascontiguousarray(values, dtype=dtype).ravel()
        length[0] = values.size
    _wait(comm.Ibcast(length, root=0))
    if not is_output_rank():
        values = np.empty(int(length[0]), dtype=dtype)
    _wait(comm.Ibcast(values.view(np.uint8), root=0))
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 2
    _state["reduced_bytes"] += values.nbytes
    return values


def scatter_rows_from_output_rank(values, rows_per_rank, dtype, row_shape=()):
    """Rank r's share of rank 0's rows: rows_per_rank[r] consecutive rows of `values` (rank
    0's argument, rows of `row_shape` and `dtype`, the ranks' shares in rank order; both
    ignored on the other ranks), by a buffer Scatter of the counts and a Scatterv of the raw
    bytes. In one process: `values` itself."""
    comm = world()
    if comm is None:
        return np.asarray(values, dtype=dtype)
    from mpi4py import MPI

    start = time.perf_counter()
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(row_shape, dtype=np.int64))
    count = np.zeros(1, dtype=np.int64)
    send_counts = send = None
    if is_output_rank():
        send_counts = np.ascontiguousarray(rows_per_rank, dtype=np.int64)
        byte_counts = send_counts * row_bytes
        displacements = np.concatenate([[0], np.cumsum(byte_counts)[:-1]]).astype(np.int64)
        values = np.ascontiguousarray(values, dtype=dtype)
        send = [values.view(np.uint8).ravel(), (byte_counts, displacements), MPI.BYTE]
    _wait(comm.Iscatter(send_counts, count, root=0))
    out = np.empty((int(count[0]),) + tuple(row_shape), dtype=dtype)
    _wait(comm.Iscatterv(send, out.view(np.uint8).ravel(), root=0))
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 2
    _state["reduced_bytes"] += out.nbytes
    return out


def pass_along_ranks(values, add):
    """`add(values)` (in place on a float64 array) on each rank in turn, rank 0 first, each
    rank continuing from the values the rank before it left (buffer Recv from rank r - 1,
    Send to rank r + 1; the last rank sends the result to rank 0). A sum whose terms are
    split into consecutive runs by rank so has the bits of one pass over all of them, for
    any number of ranks. Returns the final values on rank 0, this rank's partial values on
    the others; in one process: add(values), values."""
    comm = world()
    values = np.ascontiguousarray(values, dtype=np.float64)
    if comm is None:
        add(values)
        return values
    start = time.perf_counter()
    me, size = comm.Get_rank(), comm.Get_size()
    if me > 0:
        _wait(comm.Irecv(values, source=me - 1, tag=_PASS_TAG))
    add(values)
    _wait(comm.Isend(values, dest=(me + 1) % size, tag=_PASS_TAG))
    if me == 0:
        _wait(comm.Irecv(values, source=size - 1, tag=_PASS_TAG))
    _state["comm_seconds"] += time.perf_counter() - start
    _state["reductions"] += 1
    _state["reduced_bytes"] += values.nbytes
    return values


# tag of pass_along_ranks's messages (no other point-to-point message uses COMM_WORLD)
_PASS_TAG = 11
