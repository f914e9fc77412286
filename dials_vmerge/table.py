"""The reflection table: named numpy columns with DIALS column types, identifiers and flags.

Columns are plain numpy arrays (structure of arrays). Each column also carries the DIALS C++
type name it is written as, so a table read from a `.refl` file writes back byte for byte.
A column read from a file may still be a `LazyColumn` (its bytes left in the file) until
`t[name]` first reads it; selecting, copying, splitting and joining tables keep such columns
lazy, so a program only holds the columns it uses.
"""

from __future__ import annotations

import sys
from typing import Dict, Iterator, List

import numpy as np

from . import flags as _flags
from .errors import VmergeError
from .lazy_column import LazyColumn

# DIALS type name -> (numpy dtype, shape of one row)
COLUMN_TYPES = {
    "double": (np.dtype("<f8"), ()),
    "int": (np.dtype("<i4"), ()),
    "std::size_t": (np.dtype("<u8"), ()),
    "bool": (np.dtype("bool"), ()),
    "int6": (np.dtype("<i4"), (6,)),
    "vec2<double>": (np.dtype("<f8"), (2,)),
    "vec3<double>": (np.dtype("<f8"), (3,)),
    "mat3<double>": (np.dtype("<f8"), (3, 3)),
    "cctbx::miller::index<>": (np.dtype("<i4"), (3,)),
    "std::string": (None, ()),
    "Shoebox<>": (None, ()),
}

# Column names whose DIALS type is fixed whatever numpy dtype a caller hands us.
KNOWN_COLUMN_TYPES = {
    "miller_index": "cctbx::miller::index<>",
    "original_index": "std::size_t",
    "flags": "std::size_t",
    "panel": "std::size_t",
    "partial_id": "std::size_t",
    "id": "int",
    "imageset_id": "int",
    "bbox": "int6",
    "entering": "bool",
}


def infer_column_type(name: str, values: np.ndarray) -> str:
    """The DIALS type name a new column should be written as."""
    if name in KNOWN_COLUMN_TYPES:
        return KNOWN_COLUMN_TYPES[name]
    shape = values.shape[1:]
    kind = values.dtype.kind
    if kind == "b":
        return "bool"
    if kind == "f":
        return {(): "double", (2,): "vec2<double>", (3,): "vec3<double>", (3, 3): "mat3<double>"}[
            shape
        ]
    if kind == "u" and shape == ():
        return "std::size_t"
    if kind in "iu":
        return {(): "int", (3,): "cctbx::miller::index<>", (6,): "int6"}[shape]
    raise ValueError(f"cannot store a column of dtype {values.dtype} and shape {shape}")


class ReflectionTable:
    """Columns of equal length, the `identifiers` map (id -> experiment identifier) and types."""

    def __init__(self, nrows: int = 0, identifiers: Dict[int, str] | None = None):
        self._columns: Dict[str, object] = {}
        self._types: Dict[str, str] = {}
        # Columns read from a file by this table: the LazyColumn each array came from.
        self._origins: Dict[str, LazyColumn] = {}
        self.nrows = int(nrows)
        self.identifiers: Dict[int, str] = dict(identifiers or {})

    # -- columns -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.nrows

    def __contains__(self, name: str) -> bool:
        return name in self._columns

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def keys(self):
        return list(self._columns)

    def _stored(self, name: str):
        """What the table holds for column `name`: an array, a LazyColumn or a shoebox."""
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(f"reflection table has no column '{name}'") from None

    def file_rows_of(self, name: str, rows: np.ndarray):
        """(the column's LazyColumn, the file rows behind table rows `rows`) while column
        `name` is still in its file; None while it is held in memory."""
        values = self._stored(name)
        if not isinstance(values, LazyColumn):
            return None
        return values, values.file_rows_of(rows)

    def __getitem__(self, name: str):
        values = self._stored(name)
        if isinstance(values, LazyColumn):
            self._origins[name] = values
            values = values.materialise()
            self._columns[name] = values
        return values

    def peek(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Column `name` (rows `rows` if given) without keeping what is read: a column still
        in its file is read into a new array the table does not hold on to. For a read-once
        use (merging, writing) this avoids a full in-memory copy living as long as the table.
        An in-memory column is returned as is (or indexed by `rows`)."""
        values = self._stored(name)
        if isinstance(values, LazyColumn):
            return (values if rows is None else values.select(rows)).materialise()
        return values if rows is None else values[rows]

    def release_unchanged(self, names=None) -> List[str]:
        """Give the memory of columns read from the file back: each column this table read
        (of `names`, default all) that still equals the file's bytes and is referenced by
        nothing but this table becomes lazy again. Returns the names released."""
        released = []
        for name in list(self._origins if names is None else names):
            origin = self._origins.get(name)
            if origin is None:
                continue
            values = self._columns[name]
            # 3 references: the table's dict, `values`, getrefcount's argument. More means a
            # caller (or a view) still holds the array and may yet write to it.
            if sys.getrefcount(values) > 3 or not origin.matches(values):
                continue
            self._columns[name] = origin
            del self._origins[name]
            released.append(name)
        return released

    def spill(self, names, directory: str | None = None) -> List[str]:
        """Move in-memory numpy columns `names` to an anonymous scratch file: they become
        file-backed columns, read back (peek, [], writing) only when used. Returns the names
        spilled.

        For columns a long stage needs only now and then (scaling needs the raw summation and
        profile intensities twice, the output columns at the end): their bytes then sit in
        the page cache, which the kernel may drop, not in the process. The file is created
        unlinked in `directory` (default: the working directory, where the outputs go; else
        the system temporary directory), so nothing is left behind, even after a kill. If
        neither is writable, nothing is spilled.
        """
        names = [n for n in names if isinstance(self._columns.get(n), np.ndarray)]
        return ReflectionTable.spill_together([self], names, directory)

    @staticmethod
    def spill_together(tables, names, directory: str | None = None) -> List[str]:
        """`spill` for several tables at once, each column's parts stored one after the other
        as one blob: each table then holds its rows of that blob, so concatenating the tables
        afterwards stays file-backed instead of reading every part into memory. Columns whose
        parts are already rows of one file blob (concatenation keeps them lazy) are left as
        they are. Returns the names spilled."""
        import os
        import tempfile

        from .lazy_column import FileSource

        tables = list(tables)

        def wanted(name):
            parts = [t._columns.get(name) for t in tables]
            if any(p is None for p in parts) or tables[0]._types.get(name) in (
                    "Shoebox<>", "std::string"):
                return False
            if all(isinstance(p, LazyColumn) for p in parts):
                return len(parts) > 1 and LazyColumn.concatenate(parts) is None
            return all(isinstance(p, (np.ndarray, LazyColumn)) for p in parts)

        names = [n for n in names if wanted(n)]
        if not names:
            return []
        scratch = None
        for candidate in ([directory] if directory else [os.getcwd(), None]):
            try:
                scratch = tempfile.TemporaryFile(dir=candidate, prefix=".dials_vmerge_scratch.")
                break
            except OSError:
                continue
        if scratch is None:
            return []
        total_rows = sum(t.nrows for t in tables)
        placed = []
        with scratch:
            try:
                for name in names:
                    offset = scratch.tell()
                    for t in tables:  # one part in memory at a time
                        values = np.ascontiguousarray(t.peek(name))
                        is_bool = values.dtype == np.bool_
                        scratch.write(memoryview(values.view(np.uint8) if is_bool else values)
                                      .cast("B"))
                    placed.append((name, offset, values.dtype, values.shape[1:], is_bool))
                    del values
                scratch.flush()
            except OSError:
                return []  # disk full: keep the columns in memory
            source = FileSource(f"<scratch file of {total_rows} rows>", os.dup(scratch.fileno()))
        starts = np.cumsum([0] + [t.nrows for t in tables])
        rows = [None] if len(tables) == 1 else [
            np.arange(a, b, dtype=np.int64) for a, b in zip(starts[:-1], starts[1:])]
        for name, offset, dtype, row_shape, is_bool in placed:
            for t, table_rows in zip(tables, rows):
                t._columns[name] = LazyColumn(source, name, offset, np.bool_ if is_bool else dtype,
                                              row_shape, total_rows, is_bool, table_rows)
                t._origins.pop(name, None)
        return [p[0] for p in placed]

    def lazy_column(self, name: str) -> LazyColumn | None:
        """The LazyColumn while column `name` is still only in its file, else None."""
        values = self._columns[name]
        return values if isinstance(values, LazyColumn) else None

    def is_lazy(self, name: str) -> bool:
        return self.lazy_column(name) is not None

    def __setitem__(self, name: str, values) -> None:
        self.set_column(name, values)

    def __delitem__(self, name: str) -> None:
        del self._columns[name]
        del self._types[name]
        self._origins.pop(name, None)

    def column_type(self, name: str) -> str:
        return self._types[name]

    def set_column(self, name: str, values, type_name: str | None = None) -> None:
        """Add or replace a column; its DIALS type is kept, given, or inferred."""
        if type_name is None:
            type_name = self._types.get(name)
        self._origins.pop(name, None)
        if type_name in ("Shoebox<>", "std::string") or isinstance(values, LazyColumn):
            if len(values) != self.nrows:
                raise ValueError(f"column '{name}' has {len(values)} rows, table has {self.nrows}")
            self._columns[name] = values
            self._types[name] = type_name
            return
        values = np.asarray(values)
        if type_name is None:
            type_name = infer_column_type(name, values)
        dtype, shape = COLUMN_TYPES[type_name]
        if values.ndim == 0:
            values = np.full((self.nrows,) + shape, values, dtype=dtype)
        values = np.ascontiguousarray(values, dtype=dtype)
        if values.shape != (self.nrows,) + shape:
            raise ValueError(
                f"column '{name}' has shape {values.shape}, expected {(self.nrows,) + shape}"
            )
        self._columns[name] = values
        self._types[name] = type_name

    def del_column(self, name: str) -> None:
        if name in self._columns:
            del self[name]

    # -- rows ----------------------------------------------------------------------------
    @staticmethod
    def _select_column(values, index, memo):
        if isinstance(values, np.ndarray):
            return np.ascontiguousarray(values[index])
        if isinstance(values, LazyColumn):
            return values.select(index, memo)
        return values.select(index)

    def _row_index(self, selection) -> np.ndarray:
        selection = np.asarray(selection)
        if selection.dtype == bool:
            if selection.shape != (self.nrows,):
                raise ValueError("boolean selection length differs from the table")
            return np.flatnonzero(selection)
        return selection.astype(np.int64, copy=False)

    def select(self, selection) -> "ReflectionTable":
        """A new table with the rows of a boolean mask or an integer index array."""
        index = self._row_index(selection)
        out = ReflectionTable(len(index), self.identifiers)
        memo: dict = {}  # lazy columns with the same rows share one composed row index
        for name, values in self._columns.items():
            out._columns[name] = self._select_column(values, index, memo)
            out._types[name] = self._types[name]
        return out

    def split(self, selections, consume: bool = False) -> list:
        """One table per selection (mask or row index), built column by column. consume:
        each column of this table is deleted once distributed, so the table and its parts
        never both exist in full; columns still equal to the file are split as row indices
        (release_unchanged) rather than copied."""
        indices = [self._row_index(s) for s in selections]
        if consume:
            self.release_unchanged()
        parts = [ReflectionTable(len(index), self.identifiers) for index in indices]
        memos = [{} for _ in indices]
        for name in list(self._columns):
            values = self._columns[name]
            for part, index, memo in zip(parts, indices, memos):
                part._columns[name] = self._select_column(values, index, memo)
                part._types[name] = self._types[name]
            if consume:
                del self[name]
        return parts

    def copy(self) -> "ReflectionTable":
        """An independent table; lazy columns stay lazy (they are never modified in place)."""
        out = ReflectionTable(self.nrows, self.identifiers)
        for name, values in self._columns.items():
            if isinstance(values, np.ndarray):
                out._columns[name] = values.copy()
            elif isinstance(values, LazyColumn):
                out._columns[name] = values
            else:
                out._columns[name] = values.select(np.arange(self.nrows))
            out._types[name] = self._types[name]
        return out

    @staticmethod
    def concatenate(tables, consume: bool = False) -> "ReflectionTable":
        """Rows of several tables with the same columns; `id` values are kept (DIALS `extend`).

        Lazy columns that are rows of one file column stay lazy. consume: each column of the
        inputs is deleted once joined, so the inputs and the result never both exist in full;
        columns still equal to the file are joined as row indices (release_unchanged).
        """
        tables = list(tables)
        if not tables:
            return ReflectionTable()
        names = tables[0].keys()
        for t in tables[1:]:
            if set(t.keys()) != set(names):
                missing = set(names) ^ set(t.keys())
                raise VmergeError(
                    "cannot combine reflection tables with different columns: "
                    + ", ".join(sorted(missing))
                )
        identifiers: Dict[int, str] = {}
        for t in tables:
            for key, value in t.identifiers.items():
                if identifiers.get(key, value) != value:
                    raise VmergeError(
                        f"reflection tables use id {key} for two experiments "
                        f"({identifiers[key]} and {value})"
                    )
                identifiers[key] = value
        if consume:
            for t in tables:
                t.release_unchanged()
        out = ReflectionTable(sum(t.nrows for t in tables), identifiers)
        memo: dict = {}
        for name in names:
            parts = [t._columns[name] for t in tables]
            joined = None
            if all(isinstance(p, LazyColumn) for p in parts):
                joined = LazyColumn.concatenate(parts, memo)
            if joined is None:
                parts = [t[name] for t in tables]
                if isinstance(parts[0], np.ndarray):
                    joined = np.concatenate(parts)
                else:
                    joined = type(parts[0]).concatenate(parts)
            out.set_column(name, joined, tables[0].column_type(name))
            del parts, joined
            if consume:
                for t in tables:
                    del t[name]
        return out

    # -- flags ---------------------------------------------------------------------------
    def get_flags(self, mask: int, all: bool = True) -> np.ndarray:
        """DIALS get_flags: all=True means every bit of mask set, all=False means any bit."""
        if "flags" not in self:
            return np.zeros(self.nrows, dtype=bool)
        f = self["flags"] & np.uint64(mask)
        return f == np.uint64(mask) if all else f != 0

    def set_flags(self, selection, mask: int) -> None:
        if "flags" not in self:
            self["flags"] = np.zeros(self.nrows, dtype=np.uint64)
        column = self["flags"]
        if isinstance(selection, np.ndarray) and selection.dtype == bool and \
                selection.shape == column.shape:
            # in place: `column[mask] |= m` gathers and scatters a copy of the selected rows
            np.bitwise_or(column, np.uint64(mask), out=column, where=selection)
        else:
            column[selection] |= np.uint64(mask)

    def unset_flags(self, selection, mask: int) -> None:
        if "flags" not in self:
            return
        self["flags"][selection] &= ~np.uint64(mask)

    flags = _flags

    def __repr__(self) -> str:
        return f"<ReflectionTable {self.nrows} rows, {len(self._columns)} columns>"


class RowView:
    """Read-only rows of a reflection table (all rows when `rows` is None), read column by
    column when asked for and never kept.

    Models configure from a few columns of the suitable rows; copying every column (as
    table.select does) or caching what is read in the table would keep data resident for
    the whole run that is needed only once.
    """

    def __init__(self, table: ReflectionTable, rows: np.ndarray | None = None):
        self._table = table
        self._rows = rows
        self.nrows = int(table.nrows if rows is None else rows.size)
        self.identifiers = getattr(table, "identifiers", {})

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def __getitem__(self, name: str) -> np.ndarray:
        return self._table.peek(name, self._rows)

    def peek(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            return self[name]
        return self._table.peek(name, rows if self._rows is None else self._rows[rows])

    def keys(self):
        return self._table.keys()

    def get_flags(self, mask: int, all: bool = True) -> np.ndarray:
        if "flags" not in self._table:
            return np.zeros(self.nrows, dtype=bool)
        f = self._table.peek("flags", self._rows) & np.uint64(mask)
        return f == np.uint64(mask) if all else f != 0


class SharedRowViews:
    """RowViews of many datasets whose columns are read together: the first request of a
    column reads it once at the rows of all datasets, and each dataset's view gets its
    slice. For thousands of small datasets (stills), where a read per dataset and column
    (one file read each for a spilled column) cost more than the reading itself.

    The columns read stay in this object until it is dropped: keep it for one set-up loop.
    """

    def __init__(self, table: ReflectionTable, rows_per_dataset):
        self._table = table
        self._rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows_per_dataset]) \
            if len(rows_per_dataset) else np.zeros(0, np.int64)
        self._bounds = np.concatenate([[0], np.cumsum([len(r) for r in rows_per_dataset])]
                                      ).astype(np.int64)
        self._columns = {}

    def column(self, name: str, position: int) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = self._table.peek(name, self._rows)
        return self._columns[name][self._bounds[position]:self._bounds[position + 1]]

    def view(self, position: int) -> "RowView":
        return _SharedRowView(self, position)


class _SharedRowView(RowView):
    def __init__(self, shared: SharedRowViews, position: int):
        super().__init__(shared._table,
                         shared._rows[shared._bounds[position]:shared._bounds[position + 1]])
        self._shared, self._position = shared, position

    def __getitem__(self, name: str) -> np.ndarray:
        # a copy, as RowView's read gives: a model may keep or change what it is given
        return self._shared.column(name, self._position).copy()

    def peek(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        values = self._shared.column(name, self._position)
        return values.copy() if rows is None else values[rows]

    def get_flags(self, mask: int, all: bool = True) -> np.ndarray:
        if "flags" not in self._table:
            return np.zeros(self.nrows, dtype=bool)
        f = self._shared.column("flags", self._position) & np.uint64(mask)
        return f == np.uint64(mask) if all else f != 0
