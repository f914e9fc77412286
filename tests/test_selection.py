"""Dataset, image and batch selection on two quartz sweeps (ids 0 and 1, images 1-100 each)."""

import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.batches import batch_numbers
from dials_vmerge.errors import SelectionError
from dials_vmerge.io.combine import load_experiments_and_reflections
from dials_vmerge.selection import (
    apply_image_exclusions,
    batches_to_image_exclusions,
    drop_empty_datasets,
    freeze_batch_offsets,
    parse_exclude_images,
    select_datasets,
)

from quartz_helpers import two_quartz_sweep_paths


@pytest.fixture
def two_sweeps(tmp_path):
    return load_experiments_and_reflections(*two_quartz_sweep_paths(tmp_path))


def test_batch_offsets_are_frozen_into_the_scans(two_sweeps):
    experiments, table = two_sweeps
    # 1-100 clashes with 1-100: the next number ending in 01 that leaves a gap is 201.
    assert freeze_batch_offsets(experiments) == [0, 200]
    assert [e.scan["batch_offset"] for e in experiments] == [0, 200]
    b = batch_numbers(table, experiments)
    assert b[table["id"] == 0].max() == 100 and b[table["id"] == 1].min() == 201
    # Dropping the first sweep keeps the second one's batch numbers (stored offsets are distinct).
    kept, sub = select_datasets(experiments, table, exclude_datasets=[0])
    assert batch_numbers(sub, kept).min() == 201


def test_dataset_selection_keeps_ids(two_sweeps):
    experiments, table = two_sweeps
    kept, sub = select_datasets(experiments, table, use_datasets=[1])
    assert kept.identifiers() == ["second-sweep"]
    assert set(sub["id"]) == {1} and sub.identifiers == {1: "second-sweep"}
    with pytest.raises(SelectionError, match="no dataset has id 7"):
        select_datasets(experiments, table, exclude_datasets=[7])
    with pytest.raises(SelectionError, match="leaves no datasets"):
        select_datasets(experiments, table, exclude_datasets=[0, 1])


def test_exclude_batches_maps_to_images_and_flags(two_sweeps):
    experiments, table = two_sweeps
    freeze_batch_offsets(experiments)
    # Batches 91-210 cover images 91-100 of sweep 0 and images 1-10 of sweep 1.
    exclusions = batches_to_image_exclusions([[91, 210]], experiments)
    assert exclusions == [(0, (91, 100)), (1, (1, 10))]
    changed = apply_image_exclusions(experiments, table, exclusions)
    assert changed == {0: (1, 90), 1: (11, 100)}
    assert experiments[0].scan["valid_image_ranges"]["001f4105-10c8-4ecd-ac88-2c789f79b510"] == [[1, 90]]
    assert experiments[1].scan["valid_image_ranges"]["second-sweep"] == [[11, 100]]
    z = table["xyzobs.px.value"][:, 2]
    excluded = table.get_flags(flags.user_excluded_in_scaling)
    batch = batch_numbers(table, experiments)
    # DIALS validity test: first - 1 <= z <= last, so rows at exactly z = 90 stay valid.
    expected = ((table["id"] == 0) & (z > 90)) | ((table["id"] == 1) & (z < 10))
    assert np.array_equal(excluded, expected)
    assert np.all((batch[excluded] >= 91) & (batch[excluded] <= 210))


def test_exclusions_compose_on_a_rerun(two_sweeps):
    experiments, table = two_sweeps
    freeze_batch_offsets(experiments)
    apply_image_exclusions(experiments, table, parse_exclude_images(["0:1:10"], experiments, table))
    apply_image_exclusions(experiments, table, parse_exclude_images(["0:50:60 0:95:100"], experiments, table))
    assert experiments[0].scan["valid_image_ranges"]["001f4105-10c8-4ecd-ac88-2c789f79b510"] == [
        [11, 49],
        [61, 94],
    ]


@pytest.mark.parametrize(
    "value, words",
    [
        ("1:10", "several datasets"),
        ("5:1:10", "no dataset has id 5"),
        ("0:200:300", "outside the scan"),
        ("0:a:b", "expected"),
        ("0:10:5", "start is after end"),
    ],
)
def test_bad_exclude_images(two_sweeps, value, words):
    experiments, table = two_sweeps
    with pytest.raises(SelectionError, match=words):
        parse_exclude_images([value], experiments, table)


def test_bad_exclude_batches(two_sweeps):
    experiments, table = two_sweeps
    freeze_batch_offsets(experiments)
    with pytest.raises(SelectionError,
                       match=r"no data in these batches \(batch ranges: 1-100, 201-300\)"):
        batches_to_image_exclusions([[500, 600]], experiments)
    with pytest.raises(SelectionError, match="first batch is after the last"):
        batches_to_image_exclusions([[20, 10]], experiments)


def test_batch_ranges_of_many_stills_are_described_in_one_short_line():
    """300 stills (batches 1, 101, ..., 29901) between two sweeps: each run of single-batch
    datasets is one entry (a rerun's error once listed all 300)."""
    from dials_vmerge.batches import describe_batch_ranges

    stills = [(1 + 100 * k, 1 + 100 * k) for k in range(300)]
    ranges = [(40001, 40100)] + stills + [(50001, 50001), (60001, 60100), (70001, 70001)]
    assert describe_batch_ranges(ranges) == (
        "40001-40100, 1-50001 (301 single-image datasets), 60001-60100, 70001-70001")
    assert describe_batch_ranges([(1, 100), (201, 300)]) == "1-100, 201-300"


def test_empty_dataset_dropped_with_warning_and_all_empty_is_error(two_sweeps):
    experiments, table = two_sweeps
    freeze_batch_offsets(experiments)
    apply_image_exclusions(experiments, table, parse_exclude_images(["1:1:100"], experiments, table))

    class Log:
        messages = []

        def warning(self, m):
            self.messages.append(m)

    log = Log()
    kept, sub = drop_empty_datasets(experiments, table, log)
    assert kept.identifiers() == ["001f4105-10c8-4ecd-ac88-2c789f79b510"]
    assert "dataset 1" in log.messages[0]
    apply_image_exclusions(kept, sub, parse_exclude_images(["0:1:100"], kept, sub))
    with pytest.raises(SelectionError, match="leaves no reflections"):
        drop_empty_datasets(kept, sub, log)
