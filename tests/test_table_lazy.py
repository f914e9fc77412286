"""Lazy (file-backed) reflection-table columns: read only what is used, write back exactly.

The reference for every value is the full msgpack decoder (decode_reflections), which reads
the whole file eagerly and shares no code with the lazy path.
"""

import gc
import glob
import gzip
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA
from dials_vmerge import flags, lazy_column
from dials_vmerge.errors import FileFormatError
from dials_vmerge.io import read_reflections, write_reflections
from dials_vmerge.io.refl import decode_reflections, encode_reflections
from dials_vmerge.pipeline import group_rows_by_dataset
from dials_vmerge.table import ReflectionTable

QUARTZ = os.path.join(DATA, "quartz_processed", "integrated.refl")
REAL_REFL = sorted(glob.glob(os.path.join(DATA, "*", "*.refl")))


def eager(path):
    with open(path, "rb") as f:
        return decode_reflections(f.read(), path)


def assert_tables_equal(a, b):
    assert a.keys() == b.keys() and a.nrows == b.nrows and a.identifiers == b.identifiers
    for name in a.keys():
        assert a.column_type(name) == b.column_type(name)
        if a.column_type(name) == "Shoebox<>":
            assert a[name].blob.tobytes() == b[name].blob.tobytes()
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def quartz_copy(tmp_path):
    path = tmp_path / "quartz.refl"
    shutil.copyfile(QUARTZ, path)
    return str(path)


# A permutation with long ascending runs, backward jumps and repeats: the gather path must
# not assume the rows are sorted or distinct.
def shuffled_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.arange(n // 2, n), rng.integers(0, n, n // 3), np.arange(0, n // 2, 3)])
    return rows.astype(np.int64)


def test_reading_reads_only_the_columns_used():
    t = read_reflections(QUARTZ)
    plain = [n for n in t.keys() if t.column_type(n) != "Shoebox<>"]
    assert all(t.is_lazy(n) for n in plain)
    source = t.lazy_column("d").source
    assert source.bytes_read == 0
    d = t["d"]
    assert source.bytes_read == 8 * 1653  # one double per row, nothing else
    assert not t.is_lazy("d") and all(t.is_lazy(n) for n in plain if n != "d")
    # keys, types and membership never read a column
    assert "miller_index" in t and t.column_type("bbox") == "int6" and len(t.keys()) == 33
    assert source.bytes_read == 8 * 1653
    assert d.flags.writeable and d.dtype == np.float64


@pytest.mark.parametrize("path", REAL_REFL, ids=os.path.basename)
def test_lazy_values_equal_the_full_decoder(path):
    assert_tables_equal(read_reflections(path, required=()), eager(path))


def test_select_of_select_equals_eager_selection():
    reference = eager(QUARTZ)
    rows = shuffled_rows(reference.nrows)
    inner = np.flatnonzero(np.arange(rows.size) % 5 != 2)[::-1]
    t = read_reflections(QUARTZ).select(rows).select(inner)
    assert all(t.is_lazy(n) for n in t.keys())
    assert_tables_equal(t, reference.select(rows).select(inner))


def test_a_selection_does_not_alias_the_callers_index_array():
    reference = eager(QUARTZ)
    rows = np.arange(10, 20, dtype=np.int64)
    t = read_reflections(QUARTZ).select(rows)
    rows += 100  # the caller reuses its array; the lazy table must not follow
    np.testing.assert_array_equal(t["d"], reference["d"][10:20])


def test_columns_selected_together_share_one_row_index():
    t = read_reflections(QUARTZ).select(np.arange(0, 1653, 2)).select(np.arange(100))
    rows = {id(t.lazy_column(n).rows) for n in t.keys()}
    assert len(rows) == 1  # not one 8-byte-per-row index per column


def test_bool_mask_and_negative_indices_select_like_numpy():
    reference = eager(QUARTZ)
    t = read_reflections(QUARTZ)
    mask = reference["d"] > 2.0
    assert_tables_equal(t.select(mask), reference.select(mask))
    assert_tables_equal(t.select(np.array([-1, 0, -1653])), reference.select(np.array([1652, 0, 0])))
    with pytest.raises(IndexError):
        t.select(np.array([1653]))


def test_concatenating_parts_of_one_file_stays_lazy():
    reference = eager(QUARTZ)
    t = read_reflections(QUARTZ)
    a, b = t.select(np.arange(1000, 1653)), t.select(np.arange(0, 1000, 7))
    joined = ReflectionTable.concatenate([a, b])
    assert all(joined.is_lazy(n) for n in joined.keys())
    expected = ReflectionTable.concatenate([reference.select(np.arange(1000, 1653)),
                                            reference.select(np.arange(0, 1000, 7))])
    assert_tables_equal(joined, expected)


def test_concatenating_lazy_with_read_columns_reads_them():
    reference = eager(QUARTZ)
    a = read_reflections(QUARTZ).select(np.arange(10))
    b = read_reflections(QUARTZ).select(np.arange(20, 30))  # a different source: cannot stay lazy
    b["d"] = b["d"] * 2
    joined = ReflectionTable.concatenate([a, b])
    assert not joined.is_lazy("d") and not joined.is_lazy("bbox")
    np.testing.assert_array_equal(joined["d"], np.r_[reference["d"][:10], 2 * reference["d"][20:30]])
    np.testing.assert_array_equal(joined["bbox"], np.r_[reference["bbox"][:10], reference["bbox"][20:30]])


def test_copy_stays_lazy_and_is_independent():
    reference = eager(QUARTZ)
    t = read_reflections(QUARTZ)
    c = t.copy()
    assert c.is_lazy("d")
    c["d"][:] = 0.0
    c.set_flags(np.ones(c.nrows, bool), flags.scaled)
    np.testing.assert_array_equal(t["d"], reference["d"])
    np.testing.assert_array_equal(t["flags"], reference["flags"])
    assert c.get_flags(flags.scaled).all() and not np.array_equal(c["flags"], t["flags"])


def test_split_and_consuming_concatenate_never_read_columns():
    t = read_reflections(QUARTZ)
    source = t.lazy_column("d").source
    reference = eager(QUARTZ)
    halves = [np.arange(0, 1653, 2), np.arange(1, 1653, 2)]
    parts = t.split(halves, consume=True)
    assert t.keys() == [] and all(p.is_lazy("d") for p in parts)
    joined = ReflectionTable.concatenate(parts, consume=True)
    assert all(p.keys() == [] for p in parts) and joined.is_lazy("xyzcal.px")
    assert source.bytes_read == 0
    assert_tables_equal(joined, reference.select(np.r_[halves[0], halves[1]]))


def test_pipeline_grouping_by_dataset_keeps_columns_lazy(tmp_path):
    """The flat engine's one table: rows regrouped dataset by dataset in experiment order,
    without reading the columns the regrouping does not need."""
    reference = eager(QUARTZ)
    two = reference.copy()
    two["id"] = (np.arange(two.nrows) % 2).astype(np.int32)
    two.identifiers = {0: "first", 1: "second"}
    path = str(tmp_path / "two.refl")
    write_reflections(two, path)
    t = read_reflections(path)
    experiments = [SimpleNamespace(identifier="second"), SimpleNamespace(identifier="first")]
    grouped, dataset_index = group_rows_by_dataset(experiments, t)
    np.testing.assert_array_equal(np.bincount(dataset_index), [826, 827])
    assert grouped.is_lazy("bbox")
    order = np.r_[np.arange(1, 1653, 2), np.arange(0, 1653, 2)]
    assert_tables_equal(grouped, two.select(order))


@pytest.mark.parametrize("chunk_rows", [lazy_column.CHUNK_ROWS, 7, 1])
def test_writing_a_selection_is_byte_identical_to_the_eager_write(tmp_path, monkeypatch, chunk_rows):
    """Small chunks exercise the windowed gather (several reads per chunk, backward jumps)."""
    monkeypatch.setattr(lazy_column, "CHUNK_ROWS", chunk_rows)
    reference = eager(QUARTZ)
    rows = shuffled_rows(reference.nrows, seed=chunk_rows)
    t = read_reflections(QUARTZ).select(rows)
    t["d"]  # one read column among lazy ones
    out = tmp_path / "selected.refl"
    write_reflections(t, str(out))
    assert out.read_bytes() == encode_reflections(reference.select(rows))
    assert all(t.is_lazy(n) for n in t.keys() if n != "d")  # writing did not keep arrays


def test_materialising_in_small_windows_gives_the_same_values(monkeypatch):
    monkeypatch.setattr(lazy_column, "CHUNK_ROWS", 5)
    reference = eager(QUARTZ)
    rows = shuffled_rows(reference.nrows, seed=3)
    assert_tables_equal(read_reflections(QUARTZ).select(rows), reference.select(rows))


def test_writing_over_the_source_while_columns_are_lazy(quartz_copy):
    reference = eager(QUARTZ)
    keep = np.flatnonzero(reference["d"] > 1.5)[::-1]
    t = read_reflections(quartz_copy).select(keep)
    t["intensity.sum.value"] = t["intensity.sum.value"] * 3
    write_reflections(t, quartz_copy)  # temp file + rename over the file the columns are in
    expected = reference.select(keep)
    expected["intensity.sum.value"] = expected["intensity.sum.value"] * 3
    assert open(quartz_copy, "rb").read() == encode_reflections(expected)
    assert_tables_equal(t, expected)  # the lazy columns still read the replaced file's bytes


def test_a_file_shortened_after_reading_is_named_on_access(quartz_copy):
    t = read_reflections(quartz_copy)
    os.truncate(quartz_copy, os.path.getsize(quartz_copy) // 2)
    with pytest.raises(FileFormatError, match="quartz.refl"):
        t["xyzobs.px.value"]


def test_a_file_rewritten_in_place_after_reading_is_refused(quartz_copy):
    t = read_reflections(quartz_copy)
    data = bytearray(open(quartz_copy, "rb").read())
    with open(quartz_copy, "r+b") as f:  # same size, new content, same inode
        f.write(bytes(data))
    os.utime(quartz_copy, ns=(0, 0))
    with pytest.raises(FileFormatError, match="quartz.refl: file changed on disk"):
        t["d"]


def test_a_bad_bool_value_is_named_when_the_column_is_read(tmp_path):
    reference = eager(QUARTZ)
    path = tmp_path / "badbool.refl"
    write_reflections(reference, str(path))
    offset = read_reflections(str(path)).lazy_column("entering").offset
    data = bytearray(path.read_bytes())
    data[offset + 17] = 2
    path.write_bytes(bytes(data))
    t = read_reflections(str(path))  # headers are fine: reading succeeds
    with pytest.raises(FileFormatError, match="badbool.refl: bool column 'entering'"):
        t["entering"]
    with pytest.raises(FileFormatError, match="badbool.refl: bool column 'entering'"):
        write_reflections(t, str(tmp_path / "out.refl"))


def test_the_file_is_closed_when_no_column_refers_to_it():
    t = read_reflections(QUARTZ)
    source = t.lazy_column("d").source
    fd, closer = source.fd, source._closer  # the finalizer does not keep the source alive
    os.fstat(fd)  # open
    sub = t.select(np.arange(3))
    del t, source
    gc.collect()
    assert closer.alive  # `sub` still holds lazy columns
    del sub
    gc.collect()
    assert not closer.alive
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_fully_read_table_closes_the_file_when_dropped():
    t = read_reflections(QUARTZ)
    closer = t.lazy_column("d").source._closer
    for name in t.keys():
        t[name]
    assert closer.alive  # kept for release_unchanged
    del t
    gc.collect()
    assert not closer.alive


def test_files_beyond_the_open_limit_are_read_in_full(monkeypatch):
    monkeypatch.setattr(lazy_column, "MAX_OPEN_FILES", 1)
    gc.collect()
    first = read_reflections(QUARTZ)
    second = read_reflections(QUARTZ)
    assert first.is_lazy("d") and not any(second.is_lazy(n) for n in second.keys())
    assert_tables_equal(second, eager(QUARTZ))
    del first
    gc.collect()
    assert read_reflections(QUARTZ).is_lazy("d")  # the slot is free again


def test_release_gives_back_only_unchanged_unreferenced_columns():
    reference = eager(QUARTZ)
    t = read_reflections(QUARTZ).select(shuffled_rows(1653))
    expected = reference.select(shuffled_rows(1653))
    for name in ("d", "lp", "partiality", "flags", "bbox"):
        t[name]
    t["lp"][5] += 1.0  # changed in place
    t["partiality"] = t["partiality"] * 1.0  # replaced (equal values, no longer the file's)
    held = t["bbox"]  # a caller still holds the array and could write to it
    assert sorted(t.release_unchanged()) == ["d", "flags"]
    assert t.is_lazy("d") and t.is_lazy("flags")
    assert not t.is_lazy("lp") and not t.is_lazy("partiality") and not t.is_lazy("bbox")
    expected["lp"][5] += 1.0
    assert_tables_equal(t, expected)
    del held
    released = t.release_unchanged()  # everything assert_tables_equal read, and now bbox
    assert "bbox" in released and "lp" not in released and "partiality" not in released


def test_consuming_split_and_join_release_unchanged_columns():
    t = read_reflections(QUARTZ)
    t["d"], t["lp"]  # read, unchanged
    t["flags"][0] |= np.uint64(flags.scaled)  # read, changed
    parts = t.split([np.arange(0, 1653, 2), np.arange(1, 1653, 2)], consume=True)
    assert parts[0].is_lazy("d") and parts[1].is_lazy("lp") and not parts[0].is_lazy("flags")
    parts[1]["d"]  # read again in a part
    joined = ReflectionTable.concatenate(parts, consume=True)
    assert joined.is_lazy("d") and not joined.is_lazy("flags")
    reference = eager(QUARTZ)
    reference["flags"][0] |= np.uint64(flags.scaled)
    assert_tables_equal(joined, reference.select(np.r_[np.arange(0, 1653, 2), np.arange(1, 1653, 2)]))


def test_gzip_input_is_read_eagerly(tmp_path):
    path = tmp_path / "q.refl.gz"
    path.write_bytes(gzip.compress(open(QUARTZ, "rb").read()))
    t = read_reflections(str(path))
    assert not any(t.is_lazy(n) for n in t.keys())
    assert_tables_equal(t, eager(QUARTZ))


def test_trailing_and_missing_bytes_are_refused_when_read(tmp_path):
    """Lazy reading skips the blobs, so it must still check that they end where the file does."""
    path = tmp_path / "trailing.refl"
    path.write_bytes(open(QUARTZ, "rb").read() + b"\x00")
    with pytest.raises(FileFormatError, match="trailing.refl: trailing bytes"):
        read_reflections(str(path))
    path.write_bytes(open(QUARTZ, "rb").read()[:-1])
    with pytest.raises(FileFormatError, match="trailing.refl"):
        read_reflections(str(path))


def test_peek_reads_without_keeping_and_equals_the_full_decoder():
    t = read_reflections(QUARTZ)
    reference = eager(QUARTZ)
    source = t.lazy_column("xyzobs.px.value").source
    rows = shuffled_rows(t.nrows, seed=3)
    np.testing.assert_array_equal(t.peek("xyzobs.px.value"), reference["xyzobs.px.value"])
    np.testing.assert_array_equal(t.peek("xyzobs.px.value", rows),
                                  reference["xyzobs.px.value"][rows])
    # read twice, kept never: the column is still only in its file
    assert t.is_lazy("xyzobs.px.value")
    # each read covers the column's file span once (the gather reads windows of file rows)
    assert source.bytes_read == 24 * 2 * t.nrows
    d = t["d"]  # an in-memory column is handed back as it is
    assert t.peek("d") is d
    np.testing.assert_array_equal(t.peek("d", rows), reference["d"][rows])
    with pytest.raises(KeyError):
        t.peek("no_such_column")


def test_spilled_columns_read_back_and_write_byte_identical(tmp_path):
    t = eager(QUARTZ)
    t["entering"] = t["entering"]  # a bool column among them
    expected = {n: np.array(t[n]) for n in ("intensity.sum.value", "miller_index", "entering",
                                           "flags")}
    reference = tmp_path / "reference.refl"
    write_reflections(t, str(reference))
    spilled = t.spill(["intensity.sum.value", "miller_index", "entering"], str(tmp_path))
    assert spilled == ["intensity.sum.value", "miller_index", "entering"]
    assert all(t.is_lazy(n) for n in spilled) and not t.is_lazy("flags")
    # the scratch file is unlinked at once: nothing is left in the directory
    assert sorted(os.listdir(tmp_path)) == ["reference.refl"]
    rows = shuffled_rows(t.nrows, seed=5)
    for name, values in expected.items():
        np.testing.assert_array_equal(t.peek(name, rows), values[rows])
    assert t.peek("entering").dtype == np.bool_
    again = tmp_path / "spilled.refl"
    write_reflections(t, str(again))
    assert again.read_bytes() == reference.read_bytes()
    np.testing.assert_array_equal(t["miller_index"], expected["miller_index"])


def test_tables_spilled_together_concatenate_without_reading(tmp_path):
    whole = eager(QUARTZ)
    half = whole.nrows // 2
    parts = whole.split([np.arange(half), np.arange(half, whole.nrows)])
    parts[1]["intensity.sum.value"] = parts[1]["intensity.sum.value"] * 2.0  # differs from file
    expected = np.concatenate([parts[0]["intensity.sum.value"], parts[1]["intensity.sum.value"]])
    spilled = ReflectionTable.spill_together(parts, parts[0].keys(), str(tmp_path))
    assert "intensity.sum.value" in spilled and "shoebox" not in spilled
    joined = ReflectionTable.concatenate(parts, consume=True)
    source = joined.lazy_column("intensity.sum.value").source
    assert all(joined.is_lazy(n) for n in spilled) and source.bytes_read == 0
    np.testing.assert_array_equal(joined["intensity.sum.value"], expected)
    np.testing.assert_array_equal(joined["miller_index"], whole["miller_index"])
    assert sorted(os.listdir(tmp_path)) == []
