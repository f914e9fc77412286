"""scaled.refl of a rank-local job (issue 11): every rank holds only its own rows of the
scaled table, rank 0 writes the one file, byte for byte the file one process writes.

No rank ever holds all rows of all columns. The ranks' rows interleave in the file (the
file is in input order, the ranks own ranges of unique reflections), so:

1. every rank sends its rows' `output_order_key` (ascending on each rank) to rank 0, which
   merges them into `owner`, the rank each file row comes from (1 B per row for up to 255
   ranks), and cuts the file rows into windows of WINDOW_ROWS; for each window it keeps
   where each of its positions comes from among the ranks' rows concatenated in rank order
   (4 B per row) and
   tells every rank how many of its rows each window holds (a small broadcast);
2. column by column (DIALS order: names sorted by their bytes) and window by window, each
   rank sends its next rows of the column (they are consecutive on the rank: both orders
   are ascending), rank 0 places them and streams the window into the file.

Rank 0's memory while writing is therefore ~5 B per row of the whole table plus two windows
of one column (<= 2 x 24 MB), against the table's ~100-400 B per row; the other ranks read
one window of one column at a time from their (file-backed) columns.

The file is written through io.atomic like every output: every rank opens the atomic file
(the commit is a collective: io.atomic._replace asks every rank), only rank 0's bytes are
published. Errors while writing (a rank's column read, rank 0's write) are exchanged before
every window's gather, so all ranks raise the same error together and unwind normally: no
file, no temporary file is left (a rank that fails alone would make mpi_world abort the
job, which kills rank 0 before it removes its temporary files).

Headers (column names and types, identifiers, total rows) are checked equal on every rank
first, so all ranks enter the same collectives in the same order or all raise the same error.
"""

from __future__ import annotations

import msgpack
import numpy as np

from ..backends import mpi_world
from ..errors import VmergeError
from ..table import COLUMN_TYPES
from .atomic import atomic_write
from .refl import write_column_header, write_table_header

# file rows per window: the unit of one gather and one write (a window of a vec3 double
# column is 6 MB on rank 0, twice: received and placed). On a 1e6-row file at N = 2, rank
# 0's write peaked 76 MB above its RSS with 2^20 rows, 27 MB with 2^18 and 2^16 (the key
# merge's sort then set the floor); ~3 collectives per window and column.
WINDOW_ROWS = 1 << 18


def _description(table):
    """What every rank must agree on before the collectives: (names in DIALS order, their
    types, identifiers), this rank's rows and whether its keys are usable."""
    names = sorted(table.keys(), key=lambda s: s.encode())
    keys = getattr(table, "output_order_key", None)
    problem = None
    if keys is None:
        problem = "has no output_order_key"
    else:
        keys = np.asarray(keys)
        if keys.shape != (table.nrows,):
            problem = f"has {keys.shape} output_order_keys for {table.nrows} rows"
        elif keys.size > 1 and not np.all(np.diff(keys.astype(np.int64)) > 0):
            problem = "has output_order_keys that are not strictly ascending"
    unsupported = [n for n in names if table.column_type(n) in ("Shoebox<>", "std::string")]
    if unsupported and problem is None:
        problem = (f"holds a {table.column_type(unsupported[0])} column '{unsupported[0]}', "
                   "which a rank-local run cannot write (output.delete_integration_shoeboxes"
                   "=True drops shoeboxes)")
    header = ([(n, table.column_type(n)) for n in names],
              sorted((int(k), str(v)) for k, v in table.identifiers.items()))
    return header, int(table.nrows), problem


def _agree(table):
    """(header, rows of every rank): identical on every rank, or every rank raises."""
    comm = mpi_world.world()
    described = comm.allgather(_description(table))
    for rank, (_, _, problem) in enumerate(described):
        if problem is not None:
            raise VmergeError(f"internal error: rank {rank}'s scaled table {problem}")
    header = described[0][0]
    for rank, (other, _, _) in enumerate(described):
        if other != header:
            raise VmergeError(f"internal error: rank {rank}'s scaled table has other columns "
                              "or identifiers than rank 0's")
    return header, np.array([d[1] for d in described], dtype=np.int64)


def _owner_windows(keys, rows_per_rank, window_rows):
    """Rank 0: (each window's sources: for each window position, its row among the window's
    rows gathered in rank order, int32), the window counts [window, rank] and an error
    message or None.
    Other ranks: (None, None, None)."""
    gathered = mpi_world.gather_rows_to_output_rank(np.ascontiguousarray(keys, np.int64))
    if not mpi_world.is_output_rank():
        return None, None, None
    n_ranks = rows_per_rank.size
    starts = np.concatenate([[0], np.cumsum(rows_per_rank)]).astype(np.int64)
    runs = [gathered[starts[r]:starts[r + 1]] for r in range(n_ranks)]
    small = np.uint8 if n_ranks < 256 else np.int32
    owner = np.empty(int(starts[-1]), dtype=small)
    # each rank's run is ascending: a row's file position is its place in its run plus the
    # rows of the other runs with smaller keys (one rank's positions held at a time, not a
    # sort of all keys: ~9 B per row at the peak instead of ~24)
    for r in range(n_ranks):
        position = np.arange(runs[r].size, dtype=np.int64)
        for other in range(n_ranks):
            if other == r or runs[other].size == 0:
                continue
            before = np.searchsorted(runs[other], runs[r], side="left")
            inside = before < runs[other].size
            if np.any(runs[other][before[inside]] == runs[r][inside]):
                return None, None, "two ranks hold rows with the same output_order_key"
            position += before
            del before, inside
        owner[position] = r
        del position
    del runs, gathered
    total = int(rows_per_rank.sum())
    n_windows = (total + window_rows - 1) // window_rows
    counts = np.zeros((n_windows, n_ranks), dtype=np.int64)
    sources = []
    for w in range(n_windows):
        part = owner[w * window_rows:(w + 1) * window_rows]
        counts[w] = np.bincount(part, minlength=n_ranks)
        # the rows of rank 0, then rank 1, ... (each in file order) -> their window positions
        placement = np.argsort(part, kind="stable")
        # and back: each window position's row among the rows gathered in rank order
        source = np.empty(part.size, dtype=np.int32)
        source[placement] = np.arange(part.size, dtype=np.int32)
        sources.append(source)
        del placement
    return sources, counts, None


def _window_counts(counts, error, n_ranks):
    """Rank 0's window counts (and error) on every rank: one broadcast of int64s
    [status, n_windows, counts...]."""
    if mpi_world.is_output_rank():
        if error is not None:
            packed = np.array([1, 0], dtype=np.int64)
        else:
            packed = np.concatenate([[0, counts.shape[0]], counts.ravel()]).astype(np.int64)
    else:
        packed = None
    packed = mpi_world.broadcast_from_output_rank(packed, np.int64)
    if packed[0] != 0:
        raise VmergeError("internal error: two ranks hold rows with the same "
                          "output_order_key")
    return packed[2:].reshape(int(packed[1]), n_ranks)


def _raise_together(error):
    """Every rank calls this with the error it met while writing (or None); if any rank met
    one, every rank raises the lowest such rank's message: the ranks leave the writer
    together, through their normal unwinding (the staged files are removed), instead of the
    healthy ranks waiting in the next gather until the failed one aborts the job (an abort
    kills rank 0 before it removes its temporary files in the output directory)."""
    comm = mpi_world.world()
    flags = np.empty(comm.Get_size(), dtype=np.int64)
    # a non-blocking buffer exchange of one flag (mpi_world._wait: returns to the
    # interpreter while waiting, and sleeps instead of spinning); the messages only on failure
    mpi_world._wait(comm.Iallgather(np.array([error is not None], dtype=np.int64), flags))
    if not flags.any():
        return
    message = None
    if error is not None:
        message = (str(error) if isinstance(error, VmergeError) else
                   f"internal error while writing the reflections on MPI rank "
                   f"{mpi_world.rank()}: {type(error).__name__}: {error}")
    messages = comm.allgather(message)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise VmergeError(first)


def _gather_window(piece, rows_of_ranks, row_bytes):
    """Every rank's rows of one window concatenated in rank order on rank 0 (None on the
    others): one buffer Gatherv whose counts every rank already knows (no count exchange)."""
    from mpi4py import MPI

    comm = mpi_world.world()
    send = piece.view(np.uint8).ravel()
    if not mpi_world.is_output_rank():
        mpi_world._wait(comm.Igatherv(send, None, root=0))
        return None
    counts = np.asarray(rows_of_ranks, dtype=np.int64) * row_bytes
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    gathered = np.empty(int(counts.sum()), dtype=np.uint8)
    mpi_world._wait(comm.Igatherv(send, [gathered, (counts, displacements), MPI.BYTE], root=0))
    return gathered.view(piece.dtype).reshape((-1,) + piece.shape[1:])


def _local_rows(table, name, start, stop, dtype, is_bool):
    """Rows start:stop of this rank's column, contiguous in the file's element type."""
    if stop <= start:
        shape = COLUMN_TYPES[table.column_type(name)][1]
        return np.zeros((0,) + shape, dtype=np.uint8 if is_bool else dtype)
    values = table.peek(name, np.arange(start, stop, dtype=np.int64))
    if is_bool:
        return np.ascontiguousarray(values, dtype=np.uint8)
    return np.ascontiguousarray(values, dtype=dtype)


def write_rank_local_reflections(table, path: str, window_rows: int | None = None) -> None:
    """Collective: write the rows every rank holds of a rank-local scaled table as one
    `.refl` at `path` on rank 0 (module docstring). Every rank calls it, each with its own
    path (its staged path: only rank 0's is published). window_rows: default WINDOW_ROWS."""
    window_rows = int(window_rows or WINDOW_ROWS)
    header, rows_per_rank = _agree(table)
    columns, identifiers = header
    n_ranks, me = rows_per_rank.size, mpi_world.rank()
    total = int(rows_per_rank.sum())
    sources, counts, error = _owner_windows(table.output_order_key, rows_per_rank,
                                               window_rows)
    counts = _window_counts(counts, error, n_ranks)
    output = mpi_world.is_output_rank()
    failed = None  # this rank's error, raised by every rank at the next _raise_together
    with atomic_write(path, "wb") as f:
        write = f.write if output else (lambda data: None)
        packer = msgpack.Packer(use_bin_type=True)
        # the header exactly as io.refl._stream_reflections writes it
        write_table_header(write, packer, identifiers, total, len(columns))
        for name, type_name in columns:
            dtype, shape = COLUMN_TYPES[type_name]
            is_bool = type_name == "bool"
            element_bytes = dtype.itemsize * int(np.prod(shape))
            write_column_header(write, packer, name, type_name, total, element_bytes * total)
            start = 0
            for w in range(counts.shape[0]):
                stop = start + int(counts[w, me])
                try:
                    piece = _local_rows(table, name, start, stop, dtype, is_bool)
                except Exception as e:  # noqa: BLE001 (raised by every rank just below)
                    failed, piece = e, None
                start = stop
                _raise_together(failed)
                gathered = _gather_window(piece, counts[w], element_bytes)
                del piece
                if not output:
                    continue
                try:
                    window = np.empty_like(gathered)
                    # a take into the window (quicker than a scatter by fancy index)
                    np.take(gathered, sources[w], axis=0, out=window, mode="clip")
                    del gathered
                    write(window.reshape(-1).data.cast("B"))
                    del window
                except Exception as e:  # noqa: BLE001 (raised by every rank at the next check)
                    failed = e
            if start != table.nrows and failed is None:  # a bug: counts missed rows
                failed = RuntimeError(f"column '{name}': sent {start} of {table.nrows} rows")
        _raise_together(failed)
