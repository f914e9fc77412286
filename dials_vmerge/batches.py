"""Global batch numbers (dials-formats.md 5.4, dials-scaling.md 10.4).

batch = floor(z_obs) + 1 + offset. Offsets are the stored `scan.batch_offset` values when
they are distinct across experiments; otherwise they are assigned DIALS-style: a range that
overlaps an earlier one moves to the next number ending in 01 that leaves a gap.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .geometry import image_range


def _next_epoch(max_batch: int) -> int:
    rem = max_batch % 100
    if rem == 99:
        return max_batch + 2
    if rem == 0:
        return max_batch + 101
    return max_batch - rem + 101


def calculate_batch_offsets(ranges: List[Tuple[int, int]]) -> List[int]:
    """DIALS `_calculate_batch_offsets` on per-experiment image ranges ((0,0) for stills)."""
    accepted: List[Tuple[int, int]] = []
    offsets = [0] * len(ranges)
    clashing = []
    for i, (lo, hi) in enumerate(ranges):
        shift = 1 if lo == 0 else 0
        lo, hi = lo + shift, hi + shift
        if any(lo <= h and hi >= l - 1 for (l, h) in accepted):
            clashing.append(i)
            continue
        offsets[i] = shift
        accepted.append((lo, hi))
    max_batch = max((h for (_, h) in accepted), default=0)
    for i in clashing:
        lo, hi = ranges[i]
        start = _next_epoch(max_batch)
        offsets[i] = start - lo
        max_batch = start + (hi - lo)
    return offsets


def batch_offsets(experiments) -> List[int]:
    """Stored offsets if distinct over the experiments with scans, else recalculated."""
    stored = [
        int(e.scan.get("batch_offset", 0)) for e in experiments if e.scan is not None and not e.is_still
    ]
    if len(stored) == len(experiments) and len(set(stored)) == len(stored):
        return stored
    ranges = [(0, 0) if e.is_still else image_range(e) for e in experiments]
    return calculate_batch_offsets(ranges)


def batch_ranges(experiments, offsets=None) -> List[Tuple[int, int]]:
    offsets = batch_offsets(experiments) if offsets is None else offsets
    out = []
    for e, off in zip(experiments, offsets):
        lo, hi = (0, 0) if e.is_still else image_range(e)
        out.append((lo + off, hi + off))
    return out


def batch_numbers(table, experiments, offsets=None) -> np.ndarray:
    """Batch of each row: floor(z_obs) + 1 + offset of the row's experiment (0 if unassigned)."""
    offsets = batch_offsets(experiments) if offsets is None else offsets
    per_id = np.zeros(max(list(table.identifiers) + [0]) + 1, dtype=np.int64)
    index_of_identifier = experiments.index_by_identifier()
    for key, ident in table.identifiers.items():
        index = index_of_identifier.get(ident, -1)
        if index >= 0:
            per_id[key] = offsets[index]
    # The ids are compared and used as indices as they are (no int64 copy) and the sums are
    # formed in place: at merging's peak RSS (the batch column of a 1e6 sweep) four arrays
    # of all rows fewer; the same values (issue 10, memory).
    ids = table["id"]
    if ids.dtype.kind not in "iu":
        ids = ids.astype(np.int64)
    batch = np.floor(table["xyzobs.px.value"][:, 2]).astype(np.int64)
    batch += 1
    valid = (ids >= 0) & (ids < len(per_id))
    if valid.all():
        batch += per_id[ids]
    else:
        batch[valid] += per_id[ids[valid]]
        batch[~valid] = 0
    return batch


def format_batch_table(experiments, offsets=None) -> str:
    """The "Experiment identifier, image_range, batch_range" table of the DIALS guide."""
    offsets = batch_offsets(experiments) if offsets is None else offsets
    rows = [("Experiment identifier", "image_range", "batch_range")]
    entries = []
    for e, (blo, bhi) in zip(experiments, batch_ranges(experiments, offsets)):
        lo, hi = (0, 0) if e.is_still else image_range(e)
        entries.append((e.identifier, lo, hi, blo, bhi))
    rows += _collapse_single_image_runs(entries)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _runs_of_single_entries(is_single):
    """(start, stop, is_run) spans over a sequence: a run of at least two consecutive entries
    for which is_single is true is one span (is_run True); every other entry is its own."""
    i = 0
    while i < len(is_single):
        j = i
        while j < len(is_single) and is_single[j]:
            j += 1
        if j - i >= 2:
            yield i, j, True
            i = j
        else:
            yield i, i + 1, False
            i += 1


def describe_batch_ranges(ranges) -> str:
    """"lo-hi, ..." of the datasets' batch ranges; a run of consecutive single-batch datasets
    (stills) is one entry, "first-last (n single-image datasets)", so that a message about
    10^4 stills stays one line."""
    parts = []
    for i, j, is_run in _runs_of_single_entries([lo == hi for lo, hi in ranges]):
        if is_run:
            parts.append(f"{ranges[i][0]}-{ranges[j - 1][1]} ({j - i} single-image datasets)")
        else:
            parts.append(f"{ranges[i][0]}-{ranges[i][1]}")
    return ", ".join(parts)


def _collapse_single_image_runs(entries):
    """Table rows from (identifier, first image, last image, first batch, last batch); a run
    of consecutive single-image datasets (stills, one-image sweeps) becomes one row, so
    that 10^4 stills do not print 10^4 lines."""
    rows = []
    single_image = [lo == hi for _, lo, hi, _, _ in entries]
    for i, j, is_run in _runs_of_single_entries(single_image):
        if is_run:
            run = entries[i:j]
            images = {(lo, hi) for _, lo, hi, _, _ in run}
            image_text = (f"{run[0][1]}-{run[0][2]}" if len(images) == 1 else "1 image each")
            rows.append((f"{j - i} single-image datasets: {run[0][0]} ... {run[-1][0]}",
                         image_text, f"{run[0][3]}-{run[-1][4]}"))
        else:
            identifier, lo, hi, blo, bhi = entries[i]
            rows.append((identifier, f"{lo}-{hi}", f"{blo}-{bhi}"))
    return rows
