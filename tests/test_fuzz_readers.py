"""Fuzzing the .refl and .expt readers with corrupted real files.

Every input either loads or raises our own FileFormatError: no other exception, no hang, and no
large allocation from a lying header (all lengths are checked against the bytes present).
"""

import os
import resource

import numpy as np

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DATA
from dials_vmerge.errors import FileFormatError
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.io.refl import decode_reflections

QUARTZ_REFL = open(os.path.join(DATA, "quartz_processed", "scaled.refl"), "rb").read()
CENTROID_REFL = open(os.path.join(DATA, "centroid_test_data", "integrated.refl"), "rb").read()
QUARTZ_EXPT = open(os.path.join(DATA, "quartz_processed", "scaled.expt"), "rb").read()

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def corrupted(original):
    """Mutation recipes (short to print on failure), applied by `apply`."""
    return st.tuples(st.just(len(original)), st.lists(_edit(len(original)), min_size=1, max_size=6))


@st.composite
def _edit(draw, size):
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
    return (kind, draw(st.floats(0, 1)), draw(st.integers(0, 255)), draw(st.binary(min_size=1, max_size=8)))


def apply(original, recipe):
    data = bytearray(original)
    for kind, where, number, blob in recipe[1]:
        if not data:
            break
        pos = min(int(where * len(data)), len(data) - 1)
        if kind == "flip":
            data[pos] ^= 1 << (number % 8)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = blob
        elif kind == "delete":
            del data[pos : pos + 1 + number % 16]
        else:  # hit the msgpack headers, where lengths live
            data[min(len(data) - 1, int(where * 400))] = number
    return bytes(data)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@FUZZ
@given(corrupted(QUARTZ_REFL))
def test_refl_reader_never_crashes(recipe):
    data = apply(QUARTZ_REFL, recipe)
    before = _peak_rss_mb()
    try:
        decode_reflections(data, "fuzz.refl")
    except FileFormatError:
        pass
    assert _peak_rss_mb() - before < 200


@FUZZ
@given(corrupted(CENTROID_REFL))
def test_refl_reader_with_shoeboxes_never_crashes(recipe):
    data = apply(CENTROID_REFL, recipe)
    try:
        decode_reflections(data, "fuzz.refl")
    except FileFormatError:
        pass


@FUZZ
@given(corrupted(QUARTZ_EXPT))
def test_expt_reader_never_crashes(recipe):
    import json

    data = apply(QUARTZ_EXPT, recipe)
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # the file reader turns these into FileFormatError (tested in test_io_expt)
    try:
        experiments = ExperimentList.from_dict(d, "fuzz.expt")
        from dials_vmerge import geometry

        for e in experiments:
            try:
                geometry.space_group(e)
            except Exception as exc:  # geometry raises VmergeError for bad crystals
                from dials_vmerge.errors import VmergeError

                assert isinstance(exc, (VmergeError, KeyError, TypeError, ValueError))
    except FileFormatError:
        pass


@FUZZ
@given(corrupted(QUARTZ_REFL))
def test_refl_file_reader_never_crashes(recipe):
    """The file path streams blobs straight into arrays; damaged files fall back to the full
    decoder, which names the problem. A valid result equals the full decoder's."""
    import tempfile

    from dials_vmerge.io import read_reflections

    data = apply(QUARTZ_REFL, recipe)
    with tempfile.NamedTemporaryFile(suffix=".refl") as f:
        f.write(data)
        f.flush()
        try:
            table = read_reflections(f.name, required=())
            for name in table.keys():
                table[name]  # lazy columns are read (and bool columns checked) on first use
        except FileFormatError:
            return
    reference = decode_reflections(data, "fuzz.refl")
    assert table.keys() == reference.keys()
    for name in table.keys():
        assert np.array_equal(table[name], reference[name], equal_nan=table[name].dtype.kind == "f")
