"""prepare_dataset(consume_input=True) moves the columns instead of copying them: the same
table as the copying path, and the input left empty."""

import os

import numpy as np

from dials_vmerge.io import read_reflections
from dials_vmerge.scaling import prepare

from conftest import DATA


def test_consuming_preparation_equals_copying_preparation():
    path = os.path.join(DATA, "quartz_processed", "integrated.refl")
    copied = prepare.prepare_dataset(read_reflections(path), partiality_cutoff=0.4)
    source = read_reflections(path)
    moved = prepare.prepare_dataset(source, partiality_cutoff=0.4, consume_input=True)
    assert moved.nrows == copied.nrows < source.nrows  # partials were summed
    assert moved.keys() == copied.keys()
    for name in copied.keys():
        assert moved.column_type(name) == copied.column_type(name)
        if isinstance(copied[name], np.ndarray):
            assert np.array_equal(moved[name], copied[name], equal_nan=True), name
    assert source.keys() == []
