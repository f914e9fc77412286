"""exclude_images with '*' for the dataset and with several ranges (issue 16, test 3).

Four sweeps of 40 images; the expected rows are recomputed here from z_obs with DIALS's rule
(a row is kept when first - 1 <= z_obs <= last for some valid range), independently of
selection.py. Only the selection step runs (no scaling), so the test takes seconds.
"""

import copy
import logging

import iotbx.phil
import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.cli import load_phil_text
from dials_vmerge.errors import VmergeError
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import select
from dials_vmerge.simulate import simulate_rotation

LOG = logging.getLogger("test_exclude_images_wildcard")
N_IMAGES = 40
N_SWEEPS = 4
USER_EXCLUDED = flags.user_excluded_in_scaling


def params(*args):
    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


@pytest.fixture(scope="module")
def simulation():
    experiments_dict, table, _ = simulate_rotation(
        n_obs_target=4000, n_sweeps=N_SWEEPS, n_images=N_IMAGES, osc_width_deg=1.0,
        model="physical", seed=5, space_group="P 21 21 21",
        unit_cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0))
    return experiments_dict, table


def run_select(simulation, *args):
    experiments_dict, table = simulation
    experiments, selected, changed = select(
        params(*args), ExperimentList.from_dict(copy.deepcopy(experiments_dict)),
        table.copy(), LOG)
    return experiments, selected, changed


def rows_in_images(table, dataset_ids, first, last):
    """Rows of the given datasets lying only in images first..last (z in pixels, image i
    spans z in [i - 1, i]); the scan ends (z = 0, z = N) belong to the first/last image."""
    z = table["xyzobs.px.value"][:, 2]
    lower = z > first - 1 if first > 1 else z >= 0
    upper = z < last if last < N_IMAGES else z <= N_IMAGES
    return np.isin(table["id"], list(dataset_ids)) & lower & upper


def expected_flags(table, baseline, ranges):
    out = baseline.copy()
    for ids, first, last in ranges:
        out |= rows_in_images(table, ids, first, last)
    return out


@pytest.fixture(scope="module")
def baseline(simulation):
    _, table, changed = run_select(simulation)
    assert changed == {}
    return table.get_flags(USER_EXCLUDED)


ALL = range(N_SWEEPS)


@pytest.mark.parametrize(
    "args, ranges, envelopes",
    [
        (("exclude_images=*:21:30",), [(ALL, 21, 30)],
         {i: (1, 40) for i in ALL}),
        # several words in one parameter: every one applies (DIALS keeps only the first)
        (("exclude_images=*:1:5 2:31:40",), [(ALL, 1, 5), ({2}, 31, 40)],
         {0: (6, 40), 1: (6, 40), 2: (6, 30), 3: (6, 40)}),
        # repeated parameters and a comma-separated list
        (("exclude_images=0:11:20", "exclude_images=3:1:10,*:36:40"),
         [({0}, 11, 20), ({3}, 1, 10), (ALL, 36, 40)],
         {0: (1, 35), 1: (1, 35), 2: (1, 35), 3: (11, 35)}),
    ],
)
def test_exactly_the_intended_rows_are_flagged(simulation, baseline, args, ranges, envelopes):
    experiments, table, changed = run_select(simulation, *args)
    expected = expected_flags(table, baseline, ranges)
    newly = expected & ~baseline
    assert newly.sum() > 50
    for ids, first, last in ranges:
        assert (rows_in_images(table, ids, first, last) & ~baseline).any()
    wrong = np.flatnonzero(table.get_flags(USER_EXCLUDED) != expected)
    assert wrong.size == 0, f"{wrong.size} rows flagged wrongly, e.g. rows {wrong[:5]}"
    assert changed == envelopes


def test_wildcard_sets_every_sweeps_valid_ranges(simulation):
    experiments, _, _ = run_select(simulation, "exclude_images=*:21:30")
    for e in experiments:
        assert e.scan["valid_image_ranges"][e.identifier] == [[1, 20], [31, 40]]


@pytest.mark.parametrize("word, message", [
    ("*:50:60", "no sweep has images 50-60"),
    ("*:30:20", "start is after end"),
    ("*:a:20", "expected"),
])
def test_wildcard_errors_name_the_parameter(simulation, word, message):
    with pytest.raises(VmergeError, match=message) as info:
        run_select(simulation, f"exclude_images={word}")
    assert f"exclude_images={word}" in str(info.value)
