"""DIALS `.refl` files: the msgpack reflection-table container (dials-formats.md section 1).

Reading never trusts the file: every length is checked against the bytes actually present
before any array is built, so a lying header cannot trigger a huge allocation.

An uncompressed file in DIALS's layout is read lazily: only the headers are parsed, and each
column becomes a `LazyColumn` pointing at its blob, read when a program first uses it (see
dials_vmerge.lazy_column). gzip files and files in any other layout are decoded in full.
"""

from __future__ import annotations

import gzip
import os
from typing import Iterable

import msgpack
import numpy as np

from ..errors import FileFormatError
from ..lazy_column import FileSource, LazyColumn
from ..table import COLUMN_TYPES, ReflectionTable
from .atomic import atomic_write
from .files import check_input_file, read_input_bytes
from .shoebox import Shoeboxes, ShoeboxFormatError

MAGIC = "dials::af::reflection_table"
WRITE_VERSION = 1
READ_VERSIONS = (1, 2)

_ELEMENT_BYTES = {
    name: dtype.itemsize * int(np.prod(shape))
    for name, (dtype, shape) in COLUMN_TYPES.items()
    if dtype is not None
}


def sniff_container(head: bytes) -> str:
    """Name the container from the first bytes of a file."""
    if head[:1] == b"\x93":
        return "msgpack"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x89HDF":
        return "hdf5"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:1] in (b"{", b"["):
        return "json"
    return "unknown"



def read_reflections(path: str, required: Iterable[str] = ("miller_index", "id")) -> ReflectionTable:
    """Read a DIALS reflection table; raise FileFormatError naming the file and the problem.

    Columns of an uncompressed file stay in the file until first used (LazyColumn). A gzip
    file's blobs (and any file's once lazy_column.MAX_OPEN_FILES files are open) are read
    straight into their numpy arrays, so the peak memory is the table itself, not the file
    bytes plus decoded objects plus arrays.
    """
    check_input_file(path, ".refl")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if not head:
                raise FileFormatError(f"{path}: file is empty, expected a DIALS .refl file")
            container = sniff_container(head)
            _check_container(container, path)
            f.seek(0)
            if container == "gzip":
                with gzip.open(f) as inner:
                    if sniff_container(inner.peek(4)[:4]) != "msgpack":
                        raise FileFormatError(f"{path}: gzip file does not hold a DIALS reflection table")
                    table = _stream_decode(inner, path)
            else:
                table = _stream_decode(f, path, FileSource.open(path, f))
    except OSError as e:
        if isinstance(e, (gzip.BadGzipFile, EOFError)):
            raise FileFormatError(f"{path}: corrupt gzip-compressed reflection file ({e})") from None
        raise FileFormatError(f"{path}: cannot read file ({e.strerror or e})") from None
    except EOFError as e:
        raise FileFormatError(f"{path}: corrupt gzip-compressed reflection file ({e})") from None
    if table is None:
        # Not the layout DIALS writes (or damaged): decode the whole file for a precise error.
        raw = read_input_bytes(path, ".refl")
        if sniff_container(raw[:4]) == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise FileFormatError(f"{path}: corrupt gzip-compressed reflection file ({e})") from None
        table = decode_reflections(raw, path)
    missing = [name for name in required if name not in table]
    if missing:
        raise FileFormatError(f"{path}: reflection table has no '{missing[0]}' column")
    return table


def _check_container(container: str, path: str) -> None:
    if container == "pickle":
        raise FileFormatError(
            f"{path}: old DIALS 2.x pickle reflection table; not supported, "
            "convert it to msgpack with a current DIALS (any program that writes .refl)"
        )
    if container == "hdf5":
        raise FileFormatError(
            f"{path}: HDF5 reflection table (DIALS_USE_H5); not supported, "
            "rewrite it as msgpack with a current DIALS"
        )
    if container == "json":
        raise FileFormatError(f"{path}: is a JSON file (an experiment list?), expected a .refl file")
    if container not in ("msgpack", "gzip"):
        raise FileFormatError(f"{path}: not a DIALS reflection file (unrecognised first bytes)")


class _NotStandard(Exception):
    """The stream is not laid out exactly as DIALS writes it; use the general decoder."""


class _Reader:
    """Just enough msgpack to walk a DIALS reflection table from a file object."""

    def __init__(self, f):
        self.f = f

    def bytes(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _NotStandard()
        return data

    def byte(self) -> int:
        return self.bytes(1)[0]

    def _sized(self, small_lo, small_hi, codes):
        b = self.byte()
        if small_lo <= b <= small_hi:
            return b - small_lo
        if b in codes:
            return int.from_bytes(self.bytes(codes[b]), "big")
        raise _NotStandard()

    def uint(self) -> int:
        return self._sized(0x00, 0x7F, {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8})

    def str(self) -> str:
        n = self._sized(0xA0, 0xBF, {0xD9: 1, 0xDA: 2, 0xDB: 4})
        try:
            return self.bytes(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _NotStandard() from None

    def array(self) -> int:
        return self._sized(0x90, 0x9F, {0xDC: 2, 0xDD: 4})

    def map(self) -> int:
        return self._sized(0x80, 0x8F, {0xDE: 2, 0xDF: 4})

    def bin(self) -> int:
        widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        b = self.byte()
        if b not in widths:
            raise _NotStandard()
        return int.from_bytes(self.bytes(widths[b]), "big")

    def into(self, array: np.ndarray) -> None:
        view = memoryview(array).cast("B")
        got = self.f.readinto(view)
        if got != view.nbytes:
            raise _NotStandard()

    def skip(self, n: int, file_size: int) -> int:
        """Step over n bytes of a seekable file of file_size bytes; the offset they start at."""
        offset = self.f.tell()
        if offset + n > file_size:
            raise _NotStandard()
        self.f.seek(n, os.SEEK_CUR)
        return offset


def _stream_decode(f, path: str, source: FileSource | None = None):
    """The table, or None if the stream is not in DIALS's exact layout (or is damaged).

    With a source (an uncompressed file), plain columns become LazyColumns on it."""
    r = _Reader(f)
    try:
        if r.array() != 3 or r.str() != MAGIC:
            return None
        version = r.uint()
        if version not in READ_VERSIONS or r.map() != 3:
            return None
        if r.str() != "identifiers":
            return None
        identifiers = {}
        for _ in range(r.map()):
            key = r.uint()
            identifiers[key] = r.str()
        if r.str() != "nrows":
            return None
        nrows = r.uint()
        if r.str() != "data":
            return None
        table = ReflectionTable(nrows, identifiers)
        for _ in range(r.map()):
            name = r.str()
            if r.array() != 2:
                return None
            type_name = r.str()
            if r.array() != 2:
                return None
            count = r.uint()
            size = r.bin()
            if type_name not in COLUMN_TYPES or count != nrows or type_name == "std::string":
                return None  # the general decoder names the problem
            if type_name == "Shoebox<>":
                try:
                    column = Shoeboxes.from_bytes(r.bytes(size), nrows)
                except ShoeboxFormatError as e:
                    raise FileFormatError(f"{path}: column '{name}': {e}") from None
                table.set_column(name, column, "Shoebox<>")
                continue
            if size != _ELEMENT_BYTES[type_name] * nrows:
                return None
            dtype, shape = COLUMN_TYPES[type_name]
            if source is not None:
                offset = r.skip(size, source.size)
                values = LazyColumn(source, name, offset, dtype, shape, nrows,
                                    is_bool=type_name == "bool")
            elif type_name == "bool":
                raw = np.empty(nrows, dtype=np.uint8)
                r.into(raw)
                if raw.size and raw.max() > 1:
                    raise FileFormatError(f"{path}: bool column '{name}' holds values other than 0/1")
                values = raw.view(bool)
            else:
                values = np.empty((nrows,) + shape, dtype=dtype)
                r.into(values)
            table.set_column(name, values, type_name)
        if (f.tell() != source.size) if source is not None else f.read(1):
            raise FileFormatError(f"{path}: trailing bytes after the reflection table")
        return table
    except _NotStandard:
        return None


def decode_reflections(raw: bytes, path: str = "<bytes>") -> ReflectionTable:
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except msgpack.ExtraData:
        raise FileFormatError(f"{path}: trailing bytes after the reflection table") from None
    except (ValueError, TypeError, msgpack.UnpackException, UnicodeDecodeError, RecursionError) as e:
        raise FileFormatError(f"{path}: truncated or corrupt msgpack reflection file ({e})") from None
    if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == MAGIC):
        raise FileFormatError(f"{path}: msgpack data is not a DIALS reflection table (wrong magic)")
    version, body = obj[1], obj[2]
    if version not in READ_VERSIONS:
        raise FileFormatError(f"{path}: unsupported reflection table version {version!r}")
    if not isinstance(body, dict):
        raise FileFormatError(f"{path}: reflection table header is not a map")
    unknown = set(body) - {"identifiers", "nrows", "data"}
    if unknown:
        raise FileFormatError(f"{path}: unknown key '{sorted(map(str, unknown))[0]}' in reflection file")
    nrows = body.get("nrows")
    data = body.get("data")
    if not isinstance(nrows, int) or nrows < 0:
        raise FileFormatError(f"{path}: reflection table has no valid 'nrows'")
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: reflection table has no 'data' map")
    identifiers = body.get("identifiers", {}) or {}
    if not isinstance(identifiers, dict) or not all(
        isinstance(k, int) and k >= 0 and isinstance(v, str) for k, v in identifiers.items()
    ):
        raise FileFormatError(f"{path}: malformed experiment identifiers map")

    table = ReflectionTable(nrows, identifiers)
    for name, entry in data.items():
        if not (
            isinstance(name, str)
            and isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and len(entry[1]) == 2
        ):
            raise FileFormatError(f"{path}: malformed entry for column {name!r}")
        type_name, (count, blob) = entry[0], entry[1]
        if type_name not in COLUMN_TYPES:
            raise FileFormatError(f"{path}: column '{name}' has unknown type '{type_name}'")
        if not isinstance(count, int) or count != nrows:
            raise FileFormatError(f"{path}: column '{name}' has {count} rows, table has {nrows}")
        if not isinstance(blob, bytes):
            raise FileFormatError(f"{path}: column '{name}' payload is not binary")
        if type_name == "std::string":
            raise FileFormatError(
                f"{path}: column '{name}' is a std::string column, which is not portable between processes"
            )
        if type_name == "Shoebox<>":
            try:
                column = Shoeboxes.from_bytes(blob, nrows)
            except ShoeboxFormatError as e:
                raise FileFormatError(f"{path}: column '{name}': {e}") from None
            table.set_column(name, column, "Shoebox<>")
            continue
        expected = _ELEMENT_BYTES[type_name] * nrows
        if len(blob) != expected:
            raise FileFormatError(
                f"{path}: column '{name}' holds {len(blob)} bytes, expected {expected} for {nrows} rows"
            )
        dtype, shape = COLUMN_TYPES[type_name]
        if type_name == "bool":
            values = np.frombuffer(blob, dtype=np.uint8)
            if values.size and values.max() > 1:
                raise FileFormatError(f"{path}: bool column '{name}' holds values other than 0/1")
            values = values.astype(bool)
        else:
            values = np.frombuffer(blob, dtype=dtype).reshape((nrows,) + shape).copy()
        table.set_column(name, values, type_name)
    return table


def _column_blobs(table: ReflectionTable):
    """(name, type name, blob size, iterable of bytes-like pieces) in DIALS order (byte order
    of the names). Lazy columns are copied from their file in bounded chunks, never whole."""
    for name in sorted(table.keys(), key=lambda s: s.encode()):
        type_name = table.column_type(name)
        if type_name == "std::string":
            raise FileFormatError(f"cannot write std::string column '{name}'")
        lazy = table.lazy_column(name)
        if lazy is not None:
            yield name, type_name, lazy.nbytes, lazy.iter_bytes()
            continue
        values = table[name]
        if type_name == "Shoebox<>":
            blob = values.to_bytes()
        elif type_name == "bool":
            blob = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1).data.cast("B")
        else:
            dtype, _ = COLUMN_TYPES[type_name]
            # flat first: memoryview cannot cast an empty (0, 3) array's view
            blob = np.ascontiguousarray(values, dtype=dtype).reshape(-1).data.cast("B")
        yield name, type_name, len(blob), (blob,)


def _bin_header(n: int) -> bytes:
    # The smallest msgpack bin format, as both msgpack-c and msgpack-python choose.
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def write_table_header(write, packer, identifiers, nrows: int, n_columns: int) -> None:
    """The encoding up to the first column: magic, version, identifiers (sorted (int, str)
    pairs), nrows and the data map's header (one writer's bytes for every caller: the
    streamed writer below and the rank-local one, io/rank_local_refl.py)."""
    write(packer.pack_array_header(3))
    write(packer.pack(MAGIC))
    write(packer.pack(WRITE_VERSION))
    write(packer.pack_map_header(3))
    write(packer.pack("identifiers"))
    write(packer.pack({int(k): str(v) for k, v in identifiers}))
    write(packer.pack("nrows"))
    write(packer.pack(int(nrows)))
    write(packer.pack("data"))
    write(packer.pack_map_header(n_columns))


def write_column_header(write, packer, name: str, type_name: str, nrows: int,
                        size: int) -> None:
    """A column's name, type and row count, and its blob's msgpack bin header (size bytes)."""
    write(packer.pack(name))
    write(packer.pack_array_header(2))
    write(packer.pack(type_name))
    write(packer.pack_array_header(2))
    write(packer.pack(int(nrows)))
    write(_bin_header(size))


def _stream_reflections(table: ReflectionTable, write) -> None:
    """Write the msgpack encoding piece by piece: column blobs are never copied into one buffer."""
    packer = msgpack.Packer(use_bin_type=True)
    write_table_header(write, packer, sorted(table.identifiers.items()), table.nrows,
                       len(table.keys()))
    for name, type_name, size, pieces in _column_blobs(table):
        write_column_header(write, packer, name, type_name, table.nrows, size)
        written = 0
        for piece in pieces:
            write(piece)
            written += len(piece)
        if written != size:  # a bug, not a user error: the header already promised `size`
            raise RuntimeError(f"column '{name}': wrote {written} bytes, expected {size}")


def encode_reflections(table: ReflectionTable) -> bytes:
    """The msgpack bytes DIALS would write for this table (version 1)."""
    parts = []
    _stream_reflections(table, parts.append)
    return b"".join(bytes(p) for p in parts)


def write_reflections(table: ReflectionTable, path: str) -> None:
    """Write a `.refl` atomically (temp file + rename), streaming column by column."""
    with atomic_write(path, "wb") as f:
        _stream_reflections(table, f.write)
