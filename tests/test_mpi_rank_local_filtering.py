"""filtering.method=deltacchalf under mpiexec (issue 11): every cycle's scaling job and the
ΔCC½ analysis between them run on each rank's own rows (pipeline.ScalingCycles,
scaling/filtering.py), and dials.vmerge's outputs are byte-identical at N = 1, 2, 3.

Three configurations, each removing something in more than one cycle (a test where nothing
is removed would not exercise the removal on the ranks nor the later cycles' partition):
- mode=dataset on a 3-sweep rotation simulation (cycle 1 removes a sweep, cycle 2 another;
  the last job scales one sweep),
- mode=dataset on 200 KB stills (datasets removed in each of 3 cycles; some stills have no
  row on some rank),
- mode=image_group on the rotation simulation (sweep ends removed; in cycle 2 a sweep loses
  its last images and is removed as a dataset).
Compared byte for byte: scaled.refl, scaled.expt, merged.mtz, dials.vmerge.json,
scale_and_filter_results.json; and the logs without timings and MPI lines.
"""

import json
import re

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)

import mpi_helpers

pytest.importorskip("mpi4py")

TIMEOUT_S = 300
OUTPUTS = ("scaled.refl", "scaled.expt", "merged.mtz", "dials.vmerge.json",
           "scale_and_filter_results.json")
SCALING_ON_RANKS = re.compile(r"MPI: scaling each rank's own unique reflections \(rows per "
                              r"rank ([\d / ]+) of (\d+)\)")
FILTER = ["filtering.method=deltacchalf", "nproc=1"]
CONFIGURATIONS = {
    "rotation_dataset": ("sweeps3", ["filtering.deltacchalf.stdcutoff=0.5",
                                     "filtering.deltacchalf.max_percent_removed=50"]),
    "stills_dataset": ("stills200", ["filtering.deltacchalf.stdcutoff=1.5",
                                     "filtering.deltacchalf.max_percent_removed=30",
                                     "filtering.deltacchalf.max_cycles=3"]),
    "rotation_image_group": ("sweeps3", ["filtering.deltacchalf.mode=image_group",
                                         "filtering.deltacchalf.stdcutoff=1",
                                         "filtering.deltacchalf.max_percent_removed=30"]),
}


@pytest.fixture(scope="module")
def datasets(rank_local_simulations):
    return rank_local_simulations


def scaling_jobs(log_text):
    """The number of scaling jobs a filtering run's log reports (cycles and rescaling)."""
    return (len(re.findall(r"^Scale and filter: cycle \d+ of at most", log_text, re.M))
            + len(re.findall(r"^Scale and filter: rescaling what is left", log_text, re.M)))


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_filtering_outputs_identical_at_one_two_three_ranks(datasets, tmp_path, name):
    data, extra = CONFIGURATIONS[name]
    expt, refl = datasets[data]
    args = ["dials.vmerge", expt, refl] + FILTER + extra
    runs = mpi_helpers.runs_at_one_two_three(args, tmp_path, TIMEOUT_S)
    one = runs[None]
    for n_ranks in (2, 3):
        mpi_helpers.assert_same_files_and_log(one, runs[n_ranks], OUTPUTS, n_ranks)
        # every scaling job of the cycles ran on the ranks' own rows: one line per job, the
        # ranks' rows adding up, fewer rows once datasets were removed
        text = (runs[n_ranks] / "dials.vmerge.log").read_text()
        shares = SCALING_ON_RANKS.findall(text)
        assert len(shares) == scaling_jobs(text) >= 3, (len(shares), scaling_jobs(text))
        totals = []
        for per_rank, total in shares:
            rows = [int(n) for n in per_rank.split(" / ")]
            assert len(rows) == n_ranks and sum(rows) == int(total)
            totals.append(int(total))
        if "image_group" not in name:
            assert totals[-1] < totals[0]

    results = json.loads((one / "scale_and_filter_results.json").read_text())
    cycles = results["cycle_results"]
    input_ids = {e["identifier"] for e in json.load(open(expt))["experiment"]}
    kept_ids = {e["identifier"] for e in json.loads((one / "scaled.expt").read_text())
                ["experiment"]}
    removed_identifiers = [i for c in cycles.values() for i in c["removed_datasets"]]
    assert kept_ids == input_ids - set(removed_identifiers)
    from dials_vmerge.io import read_reflections

    table = read_reflections(str(one / "scaled.refl"))
    # the removed datasets have no rows in scaled.refl
    assert set(table.identifiers.values()) == kept_ids
    assert set(np.unique(np.asarray(table["id"])).tolist()) <= set(table.identifiers)
    assert results["termination_reason"] is not None
    last = cycles[str(len(cycles))]
    assert last["cumul_percent_removed"] > 0
    if "image_group" in name:
        ranges = [r for c in cycles.values() for r in c["image_ranges_removed"]]
        # sweep ends removed in at least two cycles, and a sweep emptied and removed
        assert sum(1 for c in cycles.values() if c["image_ranges_removed"]) >= 2
        assert len(ranges) >= 4 and len(removed_identifiers) == 1
        # the removed ranges are gone from their kept sweeps' valid image ranges, and
        # those sweeps' rows there are excluded from scaling
        valid = {ident: rs for ident, rs in (e for e in results["expids_and_image_ranges"]
                                             if e is not None)}
        from dials_vmerge import flags

        z = np.asarray(table["xyzobs.px.value"])[:, 2]
        excluded = table.get_flags(flags.user_excluded_in_scaling)
        checked = 0
        for (first, last_image), key in ranges:
            identifier = table.identifiers.get(key)
            if identifier is None:  # the sweep removed
                continue
            for lo, hi in valid[identifier]:
                assert hi < first or lo > last_image
            inside = (np.asarray(table["id"]) == key) & (z >= first) & (z < last_image)
            assert inside.sum() > 100 and excluded[inside].all()
            checked += 1
        assert checked >= 1
    else:
        # datasets removed in at least two cycles
        assert sum(1 for c in cycles.values() if c["removed_ids"]) >= 2
        assert len(removed_identifiers) >= 2
