"""Dataset, image and batch selection (dials-scaling.md 10.2-10.4, product.md "Batches").

- `exclude_datasets`/`use_datasets` remove whole experiments (by `id` value) before scaling;
  surviving rows keep their `id` values.
- `exclude_images="exp:start:end"` (DIALS syntax; `*` for exp means every sweep) and `exclude_batches=first,last` (global
  batch numbers) shrink the scans' `valid_image_ranges` and flag the reflections outside them
  `user_excluded_in_scaling`; the models are then limited to the new envelope.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import flags
from .batches import batch_offsets, batch_ranges, describe_batch_ranges
from .errors import SelectionError
from .geometry import image_range

ImageRange = Tuple[int, int]


def freeze_batch_offsets(experiments) -> List[int]:
    """Store the batch offsets in the scans so reruns keep the same batch numbers.

    DIALS recalculates offsets whenever the stored ones clash, so removing a dataset could
    renumber the rest; writing the distinct offsets we used into `scan.batch_offset` makes
    `exclude_batches` on a rerun refer to the same images.
    """
    offsets = batch_offsets(experiments)
    for e, off in zip(experiments, offsets):
        if e.scan is not None and not e.is_still:
            e.scan["batch_offset"] = int(off)
    return offsets


def select_datasets(experiments, table, use_datasets=None, exclude_datasets=None):
    """Keep or drop whole datasets by their `id` values; ids are not renumbered."""
    if use_datasets and exclude_datasets:
        raise SelectionError("use_datasets and exclude_datasets cannot be given together")
    chosen = use_datasets or exclude_datasets
    if not chosen:
        return experiments, table
    name = "use_datasets" if use_datasets else "exclude_datasets"
    known = set(table.identifiers)
    for key in chosen:
        if key not in known:
            raise SelectionError(
                f"{name}={key}: no dataset has id {key} (ids present: "
                + ", ".join(str(k) for k in sorted(known))
                + ")"
            )
    keep_ids = set(chosen) if use_datasets else known - set(chosen)
    if not keep_ids:
        raise SelectionError(f"{name}: the selection leaves no datasets")
    keep_identifiers = {table.identifiers[k] for k in keep_ids}
    kept_experiments = experiments.select(
        [i for i, e in enumerate(experiments) if e.identifier in keep_identifiers]
    )
    rows = np.isin(table["id"], sorted(keep_ids))
    new_table = table.select(rows)
    new_table.identifiers = {k: v for k, v in table.identifiers.items() if k in keep_ids}
    return kept_experiments, new_table


def id_of_experiment(table, experiment) -> int:
    for key, ident in table.identifiers.items():
        if ident == experiment.identifier:
            return key
    raise SelectionError(f"experiment {experiment.identifier} has no reflections")


def dataset_position_of_rows(table, experiments) -> np.ndarray:
    """Per row, the position in `experiments` of the row's experiment (-1 for rows of none),
    from one pass over the `id` column."""
    key_of_identifier = {ident: key for key, ident in table.identifiers.items()}
    position_of_key = {}
    for position, e in enumerate(experiments):
        if e.identifier not in key_of_identifier:
            raise SelectionError(f"experiment {e.identifier} has no reflections")
        position_of_key[key_of_identifier[e.identifier]] = position
    ids = np.asarray(table.peek("id"), dtype=np.int64)
    low = int(ids.min()) if ids.size else 0
    high = int(ids.max()) if ids.size else 0
    if high - low <= 4 * (len(experiments) + ids.size):
        # ids are small integers: a lookup table, no sort
        lookup = np.full(high - low + 1, -1, dtype=np.int64)
        for key, position in position_of_key.items():
            if low <= key <= high:
                lookup[key - low] = position
        return lookup[ids - low]
    unique_ids, inverse = np.unique(ids, return_inverse=True)
    return np.array([position_of_key.get(int(k), -1) for k in unique_ids],
                    dtype=np.int64)[inverse.ravel()]


def rows_of_experiments(table, experiments) -> list:
    """Per experiment, the ascending row indices of its reflections: one pass over the `id`
    column (kernels.flat counting sort), not one scan of the table per experiment."""
    from .kernels.flat import rows_by_dataset

    position = dataset_position_of_rows(table, experiments)
    in_experiments = np.flatnonzero(position >= 0)
    order, offsets = rows_by_dataset(position[in_experiments], len(experiments))
    rows = in_experiments[order]
    return [rows[offsets[d]:offsets[d + 1]] for d in range(len(experiments))]


def parse_exclude_images(values: Sequence[str], experiments, table) -> List[Tuple[int, ImageRange]]:
    """DIALS `exclude_images` strings -> [(experiment index, (first, last))].

    Every range applies, whether given as repeated parameters or as several words of one
    (DIALS keeps only the first word). `*` for the dataset ("*:21:100") means images 21-100 of
    every sweep: stills, and sweeps whose scan misses the range, are skipped; it is an error
    only if no sweep has any of those images.
    """
    out = []
    flat = []
    for value in values or []:  # PHIL gives a list of string lists (multiple strings)
        if value is not None:
            flat.extend(value if isinstance(value, (list, tuple)) else [value])
    for value in flat:
        for token in str(value).replace(",", " ").split():
            parts = token.split(":")
            every_sweep = len(parts) == 3 and parts[0].strip() == "*"
            try:
                numbers = [int(p) for p in (parts[1:] if every_sweep else parts)]
            except ValueError:
                raise SelectionError(
                    f"exclude_images={token}: expected 'exp:start:end', '*:start:end' or "
                    "'start:end'"
                ) from None
            if every_sweep:
                out.extend(_exclusions_for_every_sweep(token, numbers, experiments))
                continue
            if len(numbers) == 2:
                if len(experiments) != 1:
                    raise SelectionError(
                        f"exclude_images={token}: several datasets, give 'exp:start:end' "
                        "(or '*:start:end' for every sweep)"
                    )
                index, (first, last) = 0, numbers
            elif len(numbers) == 3:
                key, first, last = numbers
                ident = table.identifiers.get(key)
                index = experiments.find(ident) if ident is not None else -1
                if index < 0:
                    raise SelectionError(f"exclude_images={token}: no dataset has id {key}")
            else:
                raise SelectionError(f"exclude_images={token}: expected 'exp:start:end' or 'start:end'")
            if first > last:
                raise SelectionError(f"exclude_images={token}: start is after end")
            e = experiments[index]
            if e.is_still:
                raise SelectionError(f"exclude_images={token}: dataset {index} has no scan (stills)")
            lo, hi = image_range(e)
            if last < lo or first > hi:
                raise SelectionError(
                    f"exclude_images={token}: images {first}-{last} are outside the scan ({lo}-{hi})"
                )
            out.append((index, (first, last)))
    return out


def _exclusions_for_every_sweep(token, numbers, experiments) -> List[Tuple[int, ImageRange]]:
    """'*:first:last': the range in every sweep whose scan overlaps it."""
    first, last = numbers
    if first > last:
        raise SelectionError(f"exclude_images={token}: start is after end")
    out = []
    for index, e in enumerate(experiments):
        if e.is_still:
            continue
        lo, hi = image_range(e)
        if last < lo or first > hi:
            continue
        out.append((index, (first, last)))
    if not out:
        raise SelectionError(f"exclude_images={token}: no sweep has images {first}-{last}")
    return out


def batches_to_image_exclusions(batch_ranges_excluded, experiments) -> List[Tuple[int, ImageRange]]:
    """Global batch ranges -> per-experiment image ranges, using the frozen batch offsets."""
    offsets = batch_offsets(experiments)
    ranges = batch_ranges(experiments, offsets)
    out = []
    for pair in [p for p in (batch_ranges_excluded or []) if p is not None]:
        first, last = int(pair[0]), int(pair[1])
        if first > last:
            raise SelectionError(f"exclude_batches={first},{last}: first batch is after the last")
        hit = False
        for index, (e, (blo, bhi), off) in enumerate(zip(experiments, ranges, offsets)):
            if last < blo or first > bhi:
                continue
            if e.is_still:
                out.append((index, (0, 0)))
            else:
                out.append((index, (max(first, blo) - off, min(last, bhi) - off)))
            hit = True
        if not hit:
            raise SelectionError(
                f"exclude_batches={first},{last}: no data in these batches (batch ranges: "
                f"{describe_batch_ranges(ranges)})"
            )
    return out


def _subtract(valid: List[ImageRange], excluded: ImageRange) -> List[ImageRange]:
    out = []
    a, b = excluded
    for lo, hi in valid:
        if b < lo or a > hi:
            out.append((lo, hi))
            continue
        if lo < a:
            out.append((lo, a - 1))
        if hi > b:
            out.append((b + 1, hi))
    return out


def valid_ranges(experiment) -> List[ImageRange]:
    if experiment.is_still:
        return []
    stored = (experiment.scan.get("valid_image_ranges") or {}).get(experiment.identifier)
    if stored is not None:
        return [tuple(int(x) for x in r) for r in stored]
    return [image_range(experiment)]


def apply_image_exclusions(experiments, table, exclusions: List[Tuple[int, ImageRange]]):
    """Shrink valid image ranges, flag rows outside them. Returns {index: envelope} changed.

    Stills datasets hit by an exclusion are removed from the valid set entirely.
    """
    by_index: Dict[int, List[ImageRange]] = {}
    for index, rng in exclusions:
        by_index.setdefault(index, []).append(rng)
    changed = {}
    for index, ranges in by_index.items():
        e = experiments[index]
        if e.is_still:
            changed[index] = None
            continue
        valid = valid_ranges(e)
        for rng in ranges:
            valid = _subtract(valid, rng)
        scan = e.scan
        scan.setdefault("valid_image_ranges", {})
        scan["valid_image_ranges"] = copy.deepcopy(scan["valid_image_ranges"])
        scan["valid_image_ranges"][e.identifier] = [list(r) for r in valid]
        changed[index] = (valid[0][0], valid[-1][1]) if valid else None
    flag_rows_outside_valid_ranges(experiments, table)
    return changed


def flag_rows_outside_valid_ranges(experiments, table) -> None:
    """Rows whose z_obs lies outside every valid range get user_excluded_in_scaling.

    A row is valid if first - 1 <= z_obs <= last for some valid range (first, last). One
    kernel pass over all rows with every dataset's ranges (kernels.valid_ranges): linear in
    rows plus datasets.
    """
    from .kernels.valid_ranges import rows_outside_valid_ranges

    if all(e.is_still for e in experiments):
        return
    position = dataset_position_of_rows(table, experiments)
    is_still = np.array([e.is_still for e in experiments] + [True], dtype=bool)
    position = np.where(is_still[position], -1, position)  # -1 (no experiment) indexes True
    z = table["xyzobs.px.value"][:, 2]
    outside = rows_outside_valid_ranges(position, z, [valid_ranges(e) for e in experiments])
    table.set_flags(outside, flags.user_excluded_in_scaling)


def drop_empty_datasets(experiments, table, log=None):
    """Datasets with no usable reflection are dropped with a warning (DIALS behaviour)."""
    bad = table.get_flags(flags.bad_for_scaling, all=False)
    keep = []
    key_of_identifier = {ident: key for key, ident in table.identifiers.items()}
    usable_ids = set(np.unique(np.asarray(table["id"])[~bad]).tolist())
    # a rank-local job (issue 11): a dataset is usable if it has a usable row on any rank
    from .backends import rank_local

    usable = rank_local.totals([key_of_identifier.get(e.identifier) in usable_ids
                                for e in experiments]) > 0
    for i, e in enumerate(experiments):
        key = key_of_identifier.get(e.identifier)
        if key is None:
            raise SelectionError(f"experiment {e.identifier} has no reflections")
        if usable[i]:
            keep.append(i)
        elif log is not None:
            log.warning(f"Warning: dataset {key} ({e.identifier}) has no reflections left; removing it")
    if not keep:
        raise SelectionError("the selection leaves no reflections to scale")
    if len(keep) == len(experiments):
        return experiments, table
    kept = experiments.select(keep)
    ids = [key_of_identifier[e.identifier] for e in kept]
    out = table.select(np.isin(table["id"], ids))
    out.identifiers = {k: v for k, v in table.identifiers.items() if k in ids}
    return kept, out
