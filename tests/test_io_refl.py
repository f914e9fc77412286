"""The .refl reader/writer: byte-identical round trips of real DIALS files, and hostile input."""

import glob
import os

import msgpack
import numpy as np
import pytest

from conftest import DATA
from dials_vmerge import flags
from dials_vmerge.errors import FileFormatError
from dials_vmerge.io import read_reflections, write_reflections
from dials_vmerge.io.refl import encode_reflections
from dials_vmerge.table import ReflectionTable

REAL_REFL = sorted(glob.glob(os.path.join(DATA, "*", "*.refl")))


def test_there_are_real_files_to_check():
    assert len(REAL_REFL) == 3


@pytest.mark.parametrize("path", REAL_REFL, ids=os.path.basename)
def test_round_trip_is_byte_identical(path, tmp_path):
    table = read_reflections(path, required=())
    out = tmp_path / "copy.refl"
    write_reflections(table, str(out))
    assert out.read_bytes() == open(path, "rb").read()


def test_quartz_integrated_contents(quartz_dir):
    t = read_reflections(os.path.join(quartz_dir, "integrated.refl"))
    assert t.nrows == 1653 and len(t.keys()) == 33
    assert t.identifiers == {0: "001f4105-10c8-4ecd-ac88-2c789f79b510"}
    assert t["miller_index"].shape == (1653, 3) and t["miller_index"].dtype == np.int32
    assert t.column_type("flags") == "std::size_t"
    # First d value of the file, read independently from the raw msgpack blob.
    raw = msgpack.unpackb(open(os.path.join(quartz_dir, "integrated.refl"), "rb").read(), strict_map_key=False)
    first_d = np.frombuffer(raw[2]["data"]["d"][1][1][:8], "<f8")[0]
    assert t["d"][0] == first_d


def test_quartz_scaled_flag_counts_match_dials(quartz_dir):
    t = read_reflections(os.path.join(quartz_dir, "scaled.refl"))
    assert t.get_flags(flags.scaled).sum() == 1401
    assert t.get_flags(flags.outlier_in_scaling).sum() == 111
    assert t.get_flags(flags.user_excluded_in_scaling).sum() == 67
    assert t.get_flags(flags.excluded_for_scaling).sum() == 108
    bad = t.get_flags(flags.bad_for_scaling, all=False)
    assert np.array_equal(bad, ~t.get_flags(flags.scaled))


def test_shoeboxes_decode_and_select():
    t = read_reflections(os.path.join(DATA, "centroid_test_data", "integrated.refl"))
    sb = t["shoebox"]
    with_pixels = np.flatnonzero(sb.marker != 0)
    assert len(with_pixels) == 278  # dials-formats.md 1.8
    assert np.array_equal(sb.panel, t["panel"].astype(np.uint32))
    data, mask, background = sb.pixels(int(with_pixels[0]))
    x0, x1, y0, y1, z0, z1 = sb.bbox[with_pixels[0]]
    assert data.shape == (z1 - z0, y1 - y0, x1 - x0)
    assert set(np.unique(mask)) <= {0, 5}
    sub = t.select(with_pixels[:3])
    assert np.array_equal(sub["shoebox"].pixels(1)[0], sb.pixels(int(with_pixels[1]))[0])
    # A selection writes and reads back to the same records.
    again = read_reflections_bytes(encode_reflections(sub))
    assert again["shoebox"].blob.tobytes() == sub["shoebox"].blob.tobytes()


def read_reflections_bytes(raw):
    from dials_vmerge.io.refl import decode_reflections

    return decode_reflections(raw)


def test_all_column_types_round_trip(tmp_path):
    t = ReflectionTable(3, {0: "a", 5: "b"})
    t.set_column("d", np.array([1.0, -0.0, np.nan]))
    t.set_column("i", np.array([1, -2, 3], dtype=np.int32), "int")
    t.set_column("flags", np.array([1, 2**40, 0], dtype=np.uint64))
    t.set_column("entering", np.array([True, False, True]))
    t.set_column("bbox", np.arange(18, dtype=np.int32).reshape(3, 6))
    t.set_column("v2", np.ones((3, 2)))
    t.set_column("s1", np.ones((3, 3)))
    t.set_column("m3", np.arange(27.0).reshape(3, 3, 3))
    t.set_column("miller_index", np.array([[1, 2, 3], [-1, 0, 4], [0, 0, 1]]))
    t.set_column("id", np.array([0, 5, 5], dtype=np.int32))
    assert [t.column_type(c) for c in ("v2", "m3", "miller_index", "id")] == [
        "vec2<double>",
        "mat3<double>",
        "cctbx::miller::index<>",
        "int",
    ]
    path = tmp_path / "all.refl"
    write_reflections(t, str(path))
    back = read_reflections(str(path))
    for name in t.keys():
        assert back.column_type(name) == t.column_type(name)
        np.testing.assert_array_equal(back[name], t[name])
    assert back.identifiers == {0: "a", 5: "b"}
    assert encode_reflections(back) == path.read_bytes()


def _quartz_bytes():
    return open(os.path.join(DATA, "quartz_processed", "integrated.refl"), "rb").read()


def _write(tmp_path, data, name="bad.refl"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("cut", [1, 100, 5000, 300000, 604461])
def test_truncated_file_is_a_clear_error(tmp_path, cut):
    path = _write(tmp_path, _quartz_bytes()[:cut])
    with pytest.raises(FileFormatError, match="bad.refl"):
        read_reflections(path)


def _reencode(mutate):
    obj = msgpack.unpackb(_quartz_bytes(), raw=False, strict_map_key=False)
    mutate(obj)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.__setitem__(0, "something else"), "wrong magic"),
        (lambda o: o.__setitem__(1, 7), "version 7"),
        (lambda o: o[2]["data"]["d"].__setitem__(0, "float"), "unknown type 'float'"),
        (lambda o: o[2]["data"]["d"][1].__setitem__(0, 5), "has 5 rows"),
        (lambda o: o[2]["data"]["d"][1].__setitem__(1, b"\0" * 16), "holds 16 bytes"),
        (lambda o: o[2]["data"].pop("miller_index"), "no 'miller_index' column"),
        (lambda o: o[2]["data"].pop("id"), "no 'id' column"),
        (lambda o: o[2].__setitem__("extra", 1), "unknown key"),
        (lambda o: o[2].__setitem__("nrows", 10**12), "rows"),
    ],
)
def test_corrupt_table_is_a_clear_error(tmp_path, mutate, message):
    path = _write(tmp_path, _reencode(mutate))
    with pytest.raises(FileFormatError, match=message):
        read_reflections(path)


def test_other_containers_are_named(tmp_path):
    for head, word in [(b"\x80\x02}q\x00.", "pickle"), (b"\x89HDF\r\n\x1a\n", "HDF5"), (b'{"a": 1}', "JSON")]:
        with pytest.raises(FileFormatError, match=word):
            read_reflections(_write(tmp_path, head))
    with pytest.raises(FileFormatError, match="empty"):
        read_reflections(_write(tmp_path, b""))
    with pytest.raises(FileFormatError, match="not found"):
        read_reflections(str(tmp_path / "missing.refl"))
    with pytest.raises(FileFormatError, match="directory"):
        read_reflections(str(tmp_path))


def test_gzip_msgpack_is_read(tmp_path):
    import gzip

    path = _write(tmp_path, gzip.compress(_quartz_bytes()), "gz.refl")
    assert read_reflections(path).nrows == 1653


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    """Permission errors cannot be provoked as root (CI runs as root), so the OS error is
    injected at open(); the reader must turn it into one line naming the file."""
    import builtins

    path = tmp_path / "locked.refl"
    path.write_bytes(_quartz_bytes())
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(FileFormatError, match="locked.refl: cannot read file \\(Permission denied\\)"):
        read_reflections(str(path))
