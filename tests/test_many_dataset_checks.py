"""Many-dataset rules: reflection_selection.method=auto by size, unit-cell consistency."""

import pytest

from dials_vmerge.scaling.selection import resolve_method


@pytest.mark.parametrize("n_suitable, n_datasets, stills, expected", [
    (19_999, 1, False, "use_all"),
    (20_000, 1, False, "quasi_random"),
    (39_999, 1, False, "quasi_random"),
    (39_999, 2, False, "use_all"),
    (39_999, 500, True, "use_all"),
    (40_000, 2, False, "quasi_random"),
    (40_000, 500, True, "intensity_ranges"),
    (None, 3, True, "intensity_ranges"),
])
def test_auto_selection_uses_every_reflection_below_the_size_rule(n_suitable, n_datasets,
                                                                   stills, expected):
    assert resolve_method("auto", stills, n_suitable, n_datasets) == expected
    assert resolve_method(None, stills, n_suitable, n_datasets) == expected


@pytest.mark.parametrize("method", ["quasi_random", "random", "use_all", "intensity_ranges"])
def test_explicit_selection_method_is_kept(method):
    assert resolve_method(method, False, 10, 2) == method
