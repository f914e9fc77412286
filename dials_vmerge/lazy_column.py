"""Reflection-table columns that stay in their `.refl` file until a program reads them.

A run of dials.vmerge reads a dozen of the ~25 columns DIALS writes; the rest (bbox, xyzcal.*,
background.*, ...) only have to be copied to scaled.refl. A `LazyColumn` remembers where its
blob lies in the input file and which of the file's rows it holds; the table turns it into a
numpy array the first time the column is read, and the writer copies it in bounded chunks.

The file is read through one open descriptor per file (`FileSource`): `os.pread` on it keeps
working when the path is unlinked or replaced by an atomic rename, which is what happens when a
program writes its output over its input. A file changed in place (size or mtime differ from
when it was read, or a read comes back short) is refused with FileFormatError naming it.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from .errors import FileFormatError

# Rows gathered per read when a selection is materialised or written: bounds the temporary
# buffers whatever the table size. At 4M rows, writing a 1e6-row scaled table raised the peak
# RSS by 75 MB (window, gathered rows and output chunk of a 24-byte column); at 256k rows the
# buffers are ~6 MB each and the extra reads cost nothing measurable.
CHUNK_ROWS = 256 * 1024
# Files held open at once; further files are read in full (a run on thousands of stills
# files must not exhaust the process's file descriptors).
MAX_OPEN_FILES = 64


class FileSource:
    """One open file descriptor on a `.refl` file, closed when no column refers to it."""

    _live: "weakref.WeakSet[FileSource]" = weakref.WeakSet()

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self.bytes_read = 0  # for tests and diagnostics: what materialising has cost
        self._closer = weakref.finalize(self, os.close, fd)
        FileSource._live.add(self)

    @classmethod
    def open(cls, path: str, fileobj) -> "FileSource | None":
        """A source on the same open file as `fileobj` (so on the bytes that were parsed), or
        None if MAX_OPEN_FILES sources are open already."""
        if len(cls._live) >= MAX_OPEN_FILES:
            return None
        return cls(path, os.dup(fileobj.fileno()))

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        """Fill `buffer` (C-contiguous) with the file's bytes from `offset`."""
        view = memoryview(buffer).cast("B")
        if view.nbytes == 0:
            return
        st = os.fstat(self.fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
            raise FileFormatError(
                f"{self.path}: file changed on disk after it was read; rerun on an unchanged file"
            )
        done = 0
        while done < view.nbytes:
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise FileFormatError(f"{self.path}: cannot read file ({e.strerror or e})") from None
            if got <= 0:
                raise FileFormatError(
                    f"{self.path}: file is shorter than when it was read (truncated on disk?)"
                )
            done += got
        self.bytes_read += done


def _compact_rows(rows, file_rows: int):
    """A selection's file rows as int32 where the file has fewer than 2^31 rows: the row
    index is held as long as a column stays in its file (the rows of an MPI rank's own
    unique reflections, issue 11: 4 B per row instead of 8). Already int32: the same
    array, so the columns of one selection share it."""
    if rows is None or rows.dtype == np.int32 or file_rows > np.iinfo(np.int32).max:
        return rows
    return rows.astype(np.int32)


class LazyColumn:
    """Rows `rows` (None: all, in order) of the column blob at `offset` in `source`."""

    def __init__(self, source: FileSource, name: str, offset: int, dtype, row_shape,
                 file_rows: int, is_bool: bool = False, rows: np.ndarray | None = None):
        self.source = source
        self.name = name
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.file_rows = int(file_rows)
        self.is_bool = is_bool  # stored as uint8 in the file; 0/1 checked when read
        self.rows = rows

    @property
    def nrows(self) -> int:
        return self.file_rows if self.rows is None else int(self.rows.size)

    def __len__(self) -> int:
        return self.nrows

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.nrows * self.row_bytes

    def _same_blob(self, other) -> bool:
        return (isinstance(other, LazyColumn) and other.source is self.source
                and other.offset == self.offset and other.dtype == self.dtype
                and other.row_shape == self.row_shape and other.file_rows == self.file_rows
                and other.is_bool == self.is_bool)

    def _with_rows(self, rows) -> "LazyColumn":
        return LazyColumn(self.source, self.name, self.offset, self.dtype, self.row_shape,
                          self.file_rows, self.is_bool, _compact_rows(rows, self.file_rows))

    # -- row algebra (no reading) -------------------------------------------------------
    def file_rows_of(self, index: np.ndarray) -> np.ndarray:
        """The file rows of table rows `index` (int64, or int32 where a selection holds them
        so (_compact_rows); negative counted from the end; a
        slice gives a view of the row index, not a copy)."""
        if self.rows is not None:
            return self.rows[index]
        if isinstance(index, slice):
            return np.arange(self.file_rows, dtype=np.int64)[index]
        index = np.array(index, dtype=np.int64)  # a copy: the caller may reuse its array
        if index.size and (index.min() < -self.file_rows or index.max() >= self.file_rows):
            raise IndexError(f"row index out of range for a column of {self.file_rows} rows")
        if index.size and index.min() < 0:
            index = np.where(index < 0, index + self.file_rows, index)
        return index

    def select(self, index, memo: dict | None = None) -> "LazyColumn":
        """The rows `index`; `memo` shares one composed index among columns of one table."""
        if memo is None:
            return self._with_rows(self.file_rows_of(index))
        key = id(self.rows)
        if key not in memo:
            memo[key] = (self.rows, _compact_rows(self.file_rows_of(index), self.file_rows))
        return self._with_rows(memo[key][1])

    @staticmethod
    def concatenate(columns, memo: dict | None = None):
        """One LazyColumn if all parts are rows of the same blob, else None."""
        first = columns[0]
        if not all(first._same_blob(c) for c in columns[1:]):
            return None
        key = tuple(id(c.rows) for c in columns)
        if memo is not None and key in memo:
            return first._with_rows(memo[key][1])
        rows = np.concatenate([
            np.arange(c.file_rows, dtype=np.int64) if c.rows is None else c.rows for c in columns
        ])
        rows = _compact_rows(rows, first.file_rows)
        if memo is not None:
            memo[key] = ([c.rows for c in columns], rows)  # keeps the keyed arrays alive
        return first._with_rows(rows)

    # -- reading ------------------------------------------------------------------------
    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        """File rows start..stop-1 as an array of the file's storage type (uint8 for bool)."""
        storage = np.dtype(np.uint8) if self.is_bool else self.dtype
        out = np.empty((stop - start,) + self.row_shape, dtype=storage)
        self.source.read_into(out, self.offset + start * self.row_bytes)
        if self.is_bool and out.size and out.max() > 1:
            raise FileFormatError(
                f"{self.source.path}: bool column '{self.name}' holds values other than 0/1"
            )
        return out

    def _gather(self, file_rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = file row file_rows[i], reading windows of at most CHUNK_ROWS file rows."""
        if file_rows.size == 0:
            return
        if np.all(file_rows[1:] >= file_rows[:-1]):
            order, ordered = None, file_rows
        else:
            order = np.argsort(file_rows, kind="stable")
            ordered = file_rows[order]
        if ordered[0] < 0 or ordered[-1] >= self.file_rows:
            raise IndexError(f"row index out of range for a column of {self.file_rows} rows")
        begin = 0
        while begin < ordered.size:
            window_start = int(ordered[begin])
            end = int(np.searchsorted(ordered, window_start + CHUNK_ROWS, side="left"))
            window = self._read_rows(window_start, int(ordered[end - 1]) + 1)
            if order is None:
                # straight into the output (the rows were range-checked above, so 'clip'
                # never clips; 'raise' would buffer): ~4x quicker than a fancy index and a
                # copy, on the ~50 column reads of a 1e6 sweep's run (issue 10)
                np.take(window, ordered[begin:end] - window_start, axis=0, out=out[begin:end],
                        mode="clip")
            else:
                out[order[begin:end]] = window[ordered[begin:end] - window_start]
            begin = end

    def materialise(self) -> np.ndarray:
        """The column as a new writable numpy array."""
        if self.rows is None:
            values = self._read_rows(0, self.file_rows)
        else:
            storage = np.dtype(np.uint8) if self.is_bool else self.dtype
            values = np.empty((self.rows.size,) + self.row_shape, dtype=storage)
            self._gather(self.rows, values)
        return values.view(bool) if self.is_bool else values

    def iter_bytes(self):
        """The column's bytes as the file stores them, in chunks of at most CHUNK_ROWS rows."""
        for start in range(0, self.nrows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.nrows)
            if self.rows is None:
                chunk = self._read_rows(start, stop)
            else:
                storage = np.dtype(np.uint8) if self.is_bool else self.dtype
                chunk = np.empty((stop - start,) + self.row_shape, dtype=storage)
                self._gather(self.rows[start:stop], chunk)
            yield chunk.data.cast("B")

    def matches(self, values: np.ndarray) -> bool:
        """True if `values` holds exactly this column's bytes (read back chunk by chunk)."""
        storage = np.dtype(np.uint8) if self.is_bool else self.dtype
        if values.dtype != (np.dtype(bool) if self.is_bool else self.dtype) or \
                values.shape != (self.nrows,) + self.row_shape or not values.flags.c_contiguous:
            return False
        flat = values.reshape(-1).view(np.uint8)
        row_bytes = storage.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        start = 0
        for chunk in self.iter_bytes():
            stored = np.frombuffer(chunk, dtype=np.uint8)
            if not np.array_equal(stored, flat[start:start + stored.size]):
                return False
            start += stored.size
        return start == self.nrows * row_bytes

    def __repr__(self) -> str:
        return (f"<LazyColumn '{self.name}' {self.nrows} rows of {self.source.path}"
                f"{'' if self.rows is None else ' (selected)'}>")
