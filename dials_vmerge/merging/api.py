"""Library entry points: merge a scaled reflection table, write the outputs.

Used by dials.vmerge.merge, dials.vmerge.stats and by dials.vmerge after scaling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import flags
from ..errors import VmergeError
from ..memory import heap_top_retained, release_free_memory
from .classical import merge_classical
from .french_wilson import french_wilson
from .groups import GroupedObservations, Groupings, mtz_isym, per_index_chunks
from .lookup import find_indices
from .merged import MergedIntensities
from .robust import DEFAULT_DOF, DEFAULT_SIGMA_SCALE, merge_robust
from .statistics import MergingStatistics, is_plus_hemisphere, merging_statistics
from .variational import merge_variational

METHODS = ("classical", "robust", "variational")
PARTIALITY_THRESHOLD = 0.4  # dials.merge's partiality_threshold for combined partials
REQUIRED_COLUMNS = ("intensity.scale.value", "intensity.scale.variance", "inverse_scale_factor",
                    "miller_index")


class ScaledObservations:
    """The rows that are merged: scaled I/g, sigma/g, with what the unmerged MTZ needs.

    batch, scale, scale_sigma and extra (FRACTIONCALC, LP, QE, XDET, YDET, ROT) serve only
    the unmerged MTZ and, batch, the half-dataset statistics: when built by
    scaled_observations they are read from the reflection table the first time one of them
    is used (the table must not have changed meanwhile), so merging never holds them."""

    def __init__(self, miller_index, intensity, sigma, batch=None, scale=None,
                 scale_sigma=None, extra=None, *, load_optional=None):
        self.miller_index = miller_index
        self.intensity = intensity
        self.sigma = sigma
        self._load_optional = load_optional
        self._optional = {}
        if load_optional is None:
            self._optional = {"batch": batch, "scale": scale, "scale_sigma": scale_sigma,
                              "extra": {} if extra is None else extra}

    def _get(self, name):
        if name not in self._optional:
            self._optional[name] = self._load_optional(name)
        return self._optional[name]

    batch = property(lambda self: self._get("batch"))
    scale = property(lambda self: self._get("scale"))
    scale_sigma = property(lambda self: self._get("scale_sigma"))
    extra = property(lambda self: self._get("extra"))

    def __len__(self):
        return len(self.intensity)


@dataclass
class MergeResult:
    method: str
    space_group: object
    unit_cell: object
    wavelength: float
    observations: ScaledObservations
    merged: MergedIntensities  # Friedel mates together
    merged_anomalous: Optional[MergedIntensities]  # I(+), I(-) apart
    statistics: Optional[MergingStatistics]
    half_dataset: Optional[dict] = None
    calibration: Optional[dict] = None  # sigma calibration (merging/calibration.py)
    per_batch: Optional[dict] = None  # batch_statistics.batch_statistics tables
    diagnostics: Optional[dict] = None  # diagnostics.merge_diagnostics summaries
    experiments: object = None  # for the unmerged MTZ's batch headers
    # the number merged when `observations` does not hold them all (MPI ranks' own rows,
    # merging/rank_merge.py)
    observation_count: Optional[int] = None

    def n_observations(self) -> int:
        return len(self.observations) if self.observation_count is None \
            else self.observation_count

    def as_json(self) -> dict:
        """JSON-able summary (merging statistics, half-dataset CV if computed)."""
        return self.as_dict()

    def as_dict(self) -> dict:
        out = {"method": self.method, "n_observations": self.n_observations(),
               "n_unique": len(self.merged)}
        if self.statistics is not None:
            out["merging_statistics"] = self.statistics.as_dict()
            out["summary_table"] = summary_table(self.statistics)
        if self.half_dataset is not None:
            out["half_dataset"] = self.half_dataset
        if self.calibration is not None:
            out["sigma_calibration"] = self.calibration
        if self.per_batch is not None:
            out["per_batch"] = self.per_batch
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out


def summary_table(statistics: MergingStatistics) -> dict:
    """The log's "Summary of merging statistics" as columns and rows (label, values...)."""
    values = statistics.summary_values()
    columns = (["Suggested", "Low", "High", "Overall"] if statistics.cut_statistics is not None
               else ["Overall", "Low", "High"])
    from .statistics import SUMMARY_FORMATS

    rows = [[label] + list(values[label]) for label, _ in SUMMARY_FORMATS if label in values]
    return {"columns": [""] + columns, "rows": rows}


def selected_methods(params) -> list:
    """merging.method as a list of method names ('all' expands to every method)."""
    chosen = _param(params, "merging.method", ["classical"])
    if isinstance(chosen, str):
        chosen = [chosen]
    if "all" in chosen:
        return list(METHODS)
    out = []
    for m in chosen:
        if m not in out:
            out.append(m)
    return out or ["classical"]


def single_method(params) -> str:
    methods = selected_methods(params)
    if len(methods) != 1:
        raise VmergeError(
            "merging.method: choose one method to merge with (" + ", ".join(METHODS)
            + "); several are only compared by dials.vmerge.stats")
    return methods[0]


def _param(params, path, default):
    node = params
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return default
    return node


# -- selecting and combining rows -----------------------------------------------------------
def apply_input_selection(params, experiments, table, log):
    """dataset_selection, exclude_images and exclude_batches for merging: like dials.merge,
    excluded rows are dropped (flagged user_excluded_in_scaling); unlike a scaling run the
    scaling flags already in the table (outliers, exclusions) are kept."""
    from ..batches import format_batch_table
    from ..selection import (
        apply_image_exclusions,
        batches_to_image_exclusions,
        freeze_batch_offsets,
        parse_exclude_images,
        select_datasets,
    )

    offsets = freeze_batch_offsets(experiments)
    log.info("\n" + format_batch_table(experiments, offsets) + "\n")
    selection = _param(params, "dataset_selection", None)
    if selection is not None:
        use = selection.use_datasets or getattr(selection, "include_datasets", None)
        experiments, table = select_datasets(experiments, table, use, selection.exclude_datasets)
    exclusions = parse_exclude_images(_param(params, "exclude_images", None) or [], experiments,
                                      table)
    exclusions += batches_to_image_exclusions(_param(params, "exclude_batches", None) or [],
                                              experiments)
    if exclusions:
        apply_image_exclusions(experiments, table, exclusions)
    return experiments, table


def scaled_observations(table, experiments, d_min=None, d_max=None,
                        unit_cell=None) -> ScaledObservations:
    """Rows good for merging: not bad_for_scaling, g > 0, variance > 0; partials combined
    (summed I/g and variance/g^2 per partial_id, kept if the summed partiality >= 0.4);
    with d_min/d_max, only observations with d_min <= d <= d_max (d from `unit_cell`,
    by default the experiments' median cell).

    Columns are read with ReflectionTable.peek, only at the rows used, so a table whose
    columns are still in their file keeps none of them in memory."""
    selection = _merge_selection(table)
    rows, inverse = selection.rows, selection.inverse
    g = table.peek("inverse_scale_factor", rows)
    intensity = table.peek("intensity.scale.value", rows)
    intensity /= g
    g *= g
    variance = table.peek("intensity.scale.variance", rows)
    variance /= g
    del g
    if inverse is not None:
        intensity = np.bincount(inverse, weights=intensity)
        variance = np.bincount(inverse, weights=variance)
        if selection.ok is not None:
            intensity, variance = intensity[selection.ok], variance[selection.ok]
    miller_index = np.ascontiguousarray(table.peek("miller_index", selection.final))
    del selection, rows, inverse
    np.sqrt(variance, out=variance)
    if unit_cell is None and (d_min is not None or d_max is not None):
        from .. import geometry

        unit_cell = geometry.median_unit_cell(experiments)
    cut = _resolution_keep(miller_index, unit_cell, d_min, d_max)
    if cut is not None:
        miller_index, intensity, variance = miller_index[cut], intensity[cut], variance[cut]
    loader = _OptionalColumns(table, experiments, cut, len(intensity))
    return ScaledObservations(miller_index, np.ascontiguousarray(intensity, dtype=np.float64),
                              np.ascontiguousarray(variance, dtype=np.float64),
                              load_optional=loader)


@dataclass
class _Selection:
    rows: np.ndarray  # table rows good for merging
    inverse: Optional[np.ndarray]  # combined observation of each of `rows` (partials), or None
    ok: Optional[np.ndarray]  # combined observations kept (summed partiality), or None
    final: np.ndarray  # the table row standing for each merged observation (its first part)
    fraction: Optional[np.ndarray]  # summed partiality of each merged observation, or None


def _merge_selection(table) -> _Selection:
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise VmergeError(
            "reflection table is not scaled: missing column(s) " + ", ".join(missing)
            + " (run dials.vmerge or dials.scale first)")
    keep = None
    for column in ("intensity.scale.value", "intensity.scale.variance", "inverse_scale_factor"):
        values = table.peek(column)
        if not np.all(np.isfinite(values)):
            raise VmergeError(f"reflection table: {column} holds NaN or infinite values")
        if column != "intensity.scale.value":
            keep = values > 0 if keep is None else keep & (values > 0)
        del values
    if "flags" in table:
        keep &= (table.peek("flags") & np.uint64(flags.bad_for_scaling)) == 0
    if not keep.any():
        raise VmergeError("no reflections left to merge (all bad_for_scaling, g <= 0 or "
                          "variance <= 0)")
    rows = np.flatnonzero(keep)
    del keep
    inverse = ok = fraction = None
    final = rows
    if "partial_id" in table:
        inverse, first = partial_groups(table, rows)
        if inverse is not None:
            final = rows[first]
            if "partiality" in table:
                fraction = np.bincount(inverse, weights=table.peek("partiality", rows))
                ok = fraction >= PARTIALITY_THRESHOLD
                final, fraction = final[ok], fraction[ok]
        del first
    if inverse is None and "partiality" in table:
        # As dials.merge: the partiality cut holds for unsplit observations too (stills have
        # partiality but, from most integrators, no partial_id).
        partiality = table.peek("partiality", rows)
        keep = partiality >= PARTIALITY_THRESHOLD
        if not keep.all():
            rows, partiality = rows[keep], partiality[keep]
            if rows.size == 0:
                raise VmergeError(f"no reflections left to merge (every partiality is below "
                                  f"{PARTIALITY_THRESHOLD})")
        final, fraction = rows, partiality
    return _Selection(rows, inverse, ok, final, fraction)


def partial_groups(table, rows):
    """Split partials of table rows `rows`: (inverse, first), the group of each row and the
    position in `rows` of each group's first piece, or (None, None) when nothing is split.

    A group is one (dataset id, partial_id) pair, as dials.merge sums partials per dataset:
    files from separate integration runs each number partial_id from 0."""
    partial_id = table.peek("partial_id", rows)
    # uint64 as int64: what astype gives, without a copy
    partial_id = (partial_id.view(np.int64) if partial_id.dtype == np.uint64
                  else partial_id.astype(np.int64))
    if "id" in table:
        dataset = table.peek("id", rows).astype(np.int64)
        span = int(partial_id.max()) + 1 if partial_id.size else 1
        if partial_id.size and partial_id.min() >= 0 and int(dataset.min()) >= 0 and \
                (int(dataset.max()) + 1) * span < 2 ** 62:
            # one stable sort on a combined key (faster than lexsort on two)
            key = dataset * span + partial_id
            del dataset, partial_id
            order = np.argsort(key, kind="stable")  # stable: first piece first in a group
            key = key[order]
            starts = np.r_[True, key[1:] != key[:-1]]
            del key
        else:
            order = np.lexsort((partial_id, dataset))
            dataset, partial_id = dataset[order], partial_id[order]
            starts = np.r_[True, (partial_id[1:] != partial_id[:-1])
                           | (dataset[1:] != dataset[:-1])]
            del dataset, partial_id
    else:
        order = np.argsort(partial_id, kind="stable")
        partial_id = partial_id[order]
        starts = np.r_[True, partial_id[1:] != partial_id[:-1]]
        del partial_id
    n_groups = int(starts.sum())
    if n_groups == len(rows):
        return None, None
    inverse = np.empty(len(rows), np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return inverse, order[starts]


def _resolution_keep(miller_index, unit_cell, d_min, d_max):
    """Mask of observations with d_min <= d <= d_max, or None without limits."""
    if d_min is None and d_max is None:
        return None
    d = per_index_chunks(miller_index, unit_cell.d)
    keep = np.ones(len(d), bool)
    if d_min is not None:
        keep &= d >= d_min
    if d_max is not None:
        keep &= d <= d_max
    if not keep.any():
        raise VmergeError(f"no reflections between d_max={d_max} and d_min={d_min}")
    return keep


class _OptionalColumns:
    """Reads batch, scale, scale_sigma or extra of the merged observations from the table
    when first asked for; the row selection is redone then (its result kept for the next
    one: the table row of each observation and the summed partiality)."""

    def __init__(self, table, experiments, cut, n_obs):
        self.table = table
        self.experiments = experiments
        self.cut = cut
        self.n_obs = n_obs
        self.rows = self.fraction = None

    def __call__(self, name):
        if self.rows is None:
            selection = _merge_selection(self.table)
            rows = selection.final
            if (self.cut is not None and len(self.cut) != len(rows)) or (
                    len(rows) if self.cut is None else int(self.cut.sum())) != self.n_obs:
                raise VmergeError("the reflection table changed after merging; its unmerged "
                                  "columns cannot be matched to the merged observations")
            self.rows, self.fraction = rows, selection.fraction
        table, rows = self.table, self.rows
        if name == "batch":
            values = _batches(table, rows, self.experiments)
        elif name == "scale":
            values = table.peek("inverse_scale_factor", rows)
        elif name == "scale_sigma":
            if "inverse_scale_factor_variance" in table:
                values = np.sqrt(np.maximum(table.peek("inverse_scale_factor_variance", rows),
                                            0))
            else:
                values = np.zeros(len(rows))
        elif name == "extra":
            values = self._extra(rows)
        else:
            raise KeyError(name)
        if self.cut is None:
            return values
        if name == "extra":
            return {k: v[self.cut] for k, v in values.items()}
        return values[self.cut]

    def _extra(self, rows):
        table, fraction = self.table, self.fraction
        extra = {}
        # dials.export's columns: BG/SIGBG from the background sum, FRACTIONCALC, XDET/YDET
        # and ROT from the calculated centroid, LP, QE (qe, else dqe, else 1). A combined
        # partial reports its first piece's values, its summed partiality as FRACTIONCALC.
        if "background.sum.value" in table and "background.sum.variance" in table:
            extra["BG"] = np.asarray(table.peek("background.sum.value", rows), dtype=np.float64)
            extra["SIGBG"] = np.sqrt(np.maximum(
                table.peek("background.sum.variance", rows), 0.0)).astype(np.float64)
        for label, column in (("FRACTIONCALC", "partiality"), ("LP", "lp")):
            if label == "FRACTIONCALC" and fraction is not None:
                extra[label] = fraction
            elif column in table:
                extra[label] = np.asarray(table.peek(column, rows), dtype=np.float64)
        centroid = "xyzcal.px" if "xyzcal.px" in table else "xyzobs.px.value"
        if centroid in table:
            xyz = table.peek(centroid, rows)
            extra["XDET"] = np.ascontiguousarray(xyz[:, 0])
            extra["YDET"] = np.ascontiguousarray(xyz[:, 1])
            extra["ROT"] = self._rotation_angles(table, rows, xyz[:, 2])
        qe = next((c for c in ("qe", "dqe") if c in table), None)
        extra["QE"] = (np.asarray(table.peek(qe, rows), dtype=np.float64) if qe
                       else np.ones(len(rows)))
        return extra

    def _rotation_angles(self, table, rows, z):
        """ROT (deg): the scan angle at frame z of each row's experiment (z for stills)."""
        from .. import geometry

        angles = np.asarray(z, dtype=np.float64).copy()
        ids = np.asarray(table.peek("id", rows), dtype=np.int64)
        index_of_identifier = self.experiments.index_by_identifier()
        for key, identifier in table.identifiers.items():
            index = index_of_identifier.get(identifier, -1)
            if index < 0 or self.experiments[index].is_still:
                continue
            mine = ids == key
            angles[mine] = geometry.rotation_angle_deg(self.experiments[index], z[mine])
        return angles


def _batches(table, rows, experiments):
    """Batch numbers of table rows `rows` (batches.batch_numbers on just those rows)."""
    from ..table import ReflectionTable

    xyz = table.peek("xyzobs.px.value", rows)
    try:
        from ..batches import batch_numbers

        view = ReflectionTable(len(rows), table.identifiers)
        view.set_column("id", table.peek("id", rows), table.column_type("id"))
        view.set_column("xyzobs.px.value", xyz, table.column_type("xyzobs.px.value"))
        return batch_numbers(view, experiments)
    except Exception:  # experiments without scans: floor(z) + 1 like DIALS
        return np.floor(xyz[:, 2]).astype(np.int64) + 1


# -- the methods ----------------------------------------------------------------------------
def merge_groups(method: str, groups: GroupedObservations, intensity, sigma, params=None,
                 french_wilson_amplitudes=True, wilson_sigma_per_group=None,
                 wilson_prior=None) -> MergedIntensities:
    """wilson_prior: the variational Sigma(d) fit's steps over all groups
    (variational.WilsonPrior; None: these groups)."""
    if method == "classical":
        merged = merge_classical(groups, intensity, sigma)
    elif method == "robust":
        merged = merge_robust(groups, intensity, sigma,
                              dof=_param(params, "merging.robust.dof", DEFAULT_DOF),
                              sigma_scale=_param(params, "merging.robust.sigma_scale",
                                                 DEFAULT_SIGMA_SCALE))
    elif method == "variational":
        merged = merge_variational(
            groups, intensity, sigma,
            dof=_param(params, "merging.variational.dof", 0.0) or 0.0,
            n_bins=_param(params, "merging.variational.n_bins", 20),
            wilson_sigma_per_group=wilson_sigma_per_group,
            prior=wilson_prior,
        )
        return merged
    else:
        raise VmergeError(f"merging.method={method} is not one of {', '.join(METHODS)}")
    if french_wilson_amplitudes and len(merged):
        _, _, F, sigma_F = french_wilson(merged.intensity, merged.sigma, merged.centric,
                                         merged.dstar_sq)
        merged.amplitude, merged.amplitude_sigma = F, sigma_F
    return merged


def friedel_positions(merged: MergedIntensities, merged_anom: MergedIntensities):
    """Rows of I(+) and I(-) in the anomalous merge for each non-anomalous reflection
    (-1 where absent; centric reflections have I(+) only).

    Kept on `merged` for the same anomalous merge and index arrays: the Friedel-mean
    amplitudes and the MTZ columns ask for the same positions (issue 10). Callers get
    copies."""
    from .lookup import find_indices_of_sets

    index = merged.asu_index
    key = (merged_anom, index, merged_anom.asu_index, merged.centric)
    memo = merged.__dict__.get("_friedel_positions")
    if memo is None or any(a is not b for a, b in zip(memo[0], key)):
        plus, minus = find_indices_of_sets([index, -index], merged_anom.asu_index)
        minus[merged.centric] = -1
        memo = (key, plus, minus)
        merged.__dict__["_friedel_positions"] = memo
    return memo[1].copy(), memo[2].copy()


def mean_of_friedel_amplitudes(merged: MergedIntensities, merged_anom: MergedIntensities):
    """F, SIGF per non-anomalous reflection: the inverse-variance mean of the F(+) and F(-)
    present (sigma sqrt(1/sum w)); NaN where neither has an amplitude."""
    plus, minus = friedel_positions(merged, merged_anom)
    sum_w = np.zeros(len(merged))
    sum_wf = np.zeros(len(merged))
    for where in (plus, minus):
        ok = where >= 0
        f = np.full(len(merged), np.nan)
        s = np.full(len(merged), np.nan)
        f[ok] = merged_anom.amplitude[where[ok]]
        s[ok] = merged_anom.amplitude_sigma[where[ok]]
        use = np.isfinite(f) & (s > 0)
        w = np.where(use, 1.0 / np.where(use, s, 1.0) ** 2, 0.0)
        sum_w += w
        sum_wf += np.where(use, w * np.nan_to_num(f), 0.0)
    has = sum_w > 0
    F = np.where(has, sum_wf / np.where(has, sum_w, 1.0), np.nan)
    sigma_F = np.where(has, 1.0 / np.sqrt(np.where(has, sum_w, 1.0)), np.nan)
    return F, sigma_F


class MethodMerger:
    """A merging method for statistics.merging_statistics(merger=...): the statistics then
    describe this method's merged intensities. `full` are the method's merges of all the data
    (non-anomalous and anomalous); a grouping equal to one of them gets its values as they
    are; any other (a resolution cut, a CC1/2 half) is merged afresh, the variational prior
    fixed to the full data's Wilson Sigma (as the half-dataset statistics do)."""

    def __init__(self, method, params, full):
        self.method = method
        self.params = params
        self.full = {m.anomalous: m for m in full}

    def _full_match(self, groups):
        full = self.full.get(groups.anomalous)
        if full is not None and np.array_equal(full.asu_index, groups.asu_index) and \
                np.array_equal(full.n_obs, groups.multiplicity):
            return full
        return None

    def _merge(self, groups, intensity, sigma):
        sigma_per_group = None
        full = self.full.get(groups.anomalous)
        if self.method == "variational" and full is not None:
            where = find_indices(groups.asu_index, full.asu_index)
            values = full.extra["wilson_sigma_per_group"]
            sigma_per_group = np.where(where >= 0, values[np.maximum(where, 0)],
                                       np.median(values))
        return merge_groups(self.method, groups, intensity, sigma, self.params,
                            french_wilson_amplitudes=False,
                            wilson_sigma_per_group=sigma_per_group)

    def merge(self, groups, intensity, sigma):
        merged = self._full_match(groups) or self._merge(groups, intensity, sigma)
        return merged.intensity, merged.sigma

    def half_means(self, groups, intensity, sigma):
        return self._merge(groups, intensity, sigma).intensity


class HalfDatasetMerger:
    """merge(groups, I, sigma, context, anomalous) for the half-dataset statistics.
    wilson_prior: makes the variational Sigma(d) fit's all-group steps for the full merges of
    `prepare` (a variational.WilsonPrior class; None: the groups given, one process)."""

    def __init__(self, method, params=None, wilson_prior=None):
        self.method = method
        self.params = params
        self.wilson_prior = wilson_prior

    def prepare(self, context, intensity, sigma):
        if self.method != "variational":
            return None
        fixed = {}
        for key, anomalous in (("full", False), ("full_anom", True)):
            groups = context[key]
            prior = self.wilson_prior() if self.wilson_prior is not None else None
            full = merge_groups("variational", groups, intensity, sigma, self.params,
                                wilson_prior=prior)
            fixed[anomalous] = (groups.asu_index, full.extra["wilson_sigma_per_group"])
        return fixed

    def __call__(self, groups, intensity, sigma, context, anomalous):
        sigma_per_group = None
        if self.method == "variational":
            index, values = context[anomalous]
            sigma_per_group = values[find_indices(groups.asu_index, index)]
        merged = merge_groups(self.method, groups, intensity, sigma, self.params,
                              french_wilson_amplitudes=False,
                              wilson_sigma_per_group=sigma_per_group)
        return merged.intensity


def merge_scaled_table(table, experiments, params, log=None, half_dataset=False) -> MergeResult:
    """Merge a scaled table with params.merging.method; statistics by shell and overall."""
    from .. import geometry

    log = log or logging.getLogger(__name__)
    method = single_method(params)
    if not len(experiments):
        raise VmergeError("no experiments to merge")
    space_group = geometry.space_group(experiments[0])
    unit_cell = geometry.median_unit_cell(experiments)
    obs = scaled_observations(table, experiments, _param(params, "merging.d_min", None),
                              _param(params, "merging.d_max", None), unit_cell)
    wavelength = geometry.wavelength(experiments[0]) if experiments[0].beam else 1.0
    return merge_observations(obs, space_group, unit_cell, wavelength, params, log,
                              half_dataset=half_dataset, experiments=experiments, table=table)


def merge_unmerged_mtz(unmerged, params, log=None, half_dataset=False) -> MergeResult:
    """Merge the observations of an unmerged MTZ (mtz.read_unmerged_mtz) as they stand:
    I and SIGI of the file, its symmetry and cell, merging.d_min/d_max applied."""
    cut = _resolution_keep(unmerged.miller_index, unmerged.unit_cell,
                           _param(params, "merging.d_min", None),
                           _param(params, "merging.d_max", None))
    take = (lambda v: v) if cut is None else (lambda v: None if v is None else v[cut])
    obs = ScaledObservations(
        np.ascontiguousarray(take(unmerged.miller_index)),
        np.ascontiguousarray(take(unmerged.intensity)), np.ascontiguousarray(take(unmerged.sigma)),
        batch=take(unmerged.batch), scale=take(unmerged.scale),
        scale_sigma=take(unmerged.scale_sigma),
        extra={k: take(v) for k, v in unmerged.extra.items()})
    return merge_observations(obs, unmerged.space_group, unmerged.unit_cell,
                              unmerged.wavelength, params, log, half_dataset=half_dataset)


# The merging stage's free heap top kept mapped (memory.heap_top_retained): half the
# scaling stages' 32 MiB, as merging's RSS comes within ~20 MiB of the run's peak (1e6 sweep).
MERGING_HEAP_TOP_RETAINED_BYTES = 16 * 1024 * 1024


def merge_observations(obs, space_group, unit_cell, wavelength, params, log=None,
                       half_dataset=False, experiments=None, table=None) -> MergeResult:
    """Merge scaled observations (ScaledObservations) with params.merging.method;
    statistics by shell and overall. experiments and table (the scaled .refl) are absent
    for an unmerged MTZ: the per-batch tables and outlier summaries need them."""
    log = log or logging.getLogger(__name__)
    method = single_method(params)
    fw = bool(_param(params, "merging.french_wilson", True))
    # The merges and statistics free and allocate arrays of the same sizes in turn: the
    # heaps' free top stays mapped (fewer page faults); the report diagnostics below,
    # the merging stage's RSS peak, run with glibc's default trimming after a trim
    # (memory.heap_top_retained; issue 10).
    with heap_top_retained(MERGING_HEAP_TOP_RETAINED_BYTES):
        # Mapped and sorted once, shared by the statistics, both merges and the half-datasets.
        groupings = Groupings(obs.miller_index, space_group, unit_cell)
        n_bins = int(_param(params, "merging.nbins", 20))

        def statistics_of(merger=None):
            try:
                return merging_statistics(
                    obs.miller_index, obs.intensity, obs.sigma, space_group, unit_cell,
                    n_bins=n_bins, with_anomalous_table=not space_group.is_centric(),
                    groupings=groupings, merger=merger)
            except Exception as e:  # too few reflections for shells: report, still write the MTZ
                log.warning(f"Merging statistics could not be computed: {e}")
                return None

        # classical: the statistics first, their temporaries gone before the merged arrays exist
        statistics = statistics_of() if method == "classical" else None
        merged = merge_groups(method, groupings.get(False), obs.intensity, obs.sigma, params, fw)
        merged_anom = merge_groups(method, groupings.get(True), obs.intensity, obs.sigma, params,
                                   fw)
        if method != "classical":
            # the statistics of this method's merged intensities (those written to merged.mtz)
            statistics = statistics_of(MethodMerger(method, params, [merged, merged_anom]))
        if fw and method != "variational" and len(merged):
            # dials.merge (anomalous=True): French-Wilson on I(+) and I(-) apart, F and SIGF the
            # inverse-variance mean of F(+) and F(-)
            merged.amplitude, merged.amplitude_sigma = mean_of_friedel_amplitudes(merged,
                                                                                  merged_anom)
        result = MergeResult(method, space_group, unit_cell, wavelength, obs, merged, merged_anom,
                             statistics, experiments=experiments)
        from .calibration import sigma_calibration

        result.calibration = sigma_calibration(obs.intensity, obs.sigma, groupings.get(True))
        if half_dataset:
            result.half_dataset = half_dataset_for(result, params, method, groupings)
    release_free_memory(collect_cycles=False)
    from .diagnostics import merge_diagnostics

    # Report-only summaries: a failure here is reported and leaves them out, it does not
    # cost the user the merged data (as for the statistics above)
    try:
        if experiments is not None:
            result.per_batch = per_batch_for(result, groupings, experiments, params)
    except Exception as e:
        log.warning(f"Statistics against batch could not be computed: {e}")
    try:
        result.diagnostics = merge_diagnostics(result, groupings, table, experiments)
    except Exception as e:
        log.warning(f"Merge diagnostics for the report could not be computed: {e}")
    return result


def per_batch_for(result: MergeResult, groupings, experiments, params=None) -> dict:
    """Statistics against batch of a merge (merging/batch_statistics.py)."""
    from .batch_statistics import batch_statistics

    obs, merged = result.observations, result.merged
    groups = groupings.get(False)
    merged_intensity = merged.intensity
    if not np.array_equal(merged.asu_index, groups.asu_index):
        merged_intensity = merged.intensity[find_indices(groups.asu_index, merged.asu_index)]
    table = batch_statistics(groups, obs.intensity, obs.sigma, obs.scale, obs.batch,
                             merged_intensity, experiments, result.space_group,
                             result.unit_cell, result.method)
    return with_excluded_batches(table, params)


def with_excluded_batches(table: dict, params) -> dict:
    """The statistics-against-batch table with the user's exclude_batches ranges."""
    table["excluded_batch_ranges"] = [[int(a), int(b)] for a, b in
                                      (_param(params, "exclude_batches", None) or [])]
    return table


def half_dataset_for(result: MergeResult, params, method: str, groupings=None) -> dict:
    """Half-dataset statistics of a merge; `groupings` those of result.observations."""
    from .halfdataset import half_dataset_statistics

    obs = result.observations
    return half_dataset_statistics(
        obs.miller_index, obs.intensity, obs.sigma, obs.batch, result.space_group,
        result.unit_cell, HalfDatasetMerger(method, params),
        repeats=int(_param(params, "merging.half_dataset_repeats", 10)),
        seed=int(_param(params, "merging.seed", 0)),
        n_bins=int(_param(params, "merging.nbins", 20)),
        groupings=groupings,
    )


# -- outputs --------------------------------------------------------------------------------
def merged_mtz_columns(result: MergeResult, free_r_seed: int = 0) -> tuple:
    """(miller indices, {label: values}) for the dials.merge column set."""
    from ..mtz import free_r_flags

    merged, anom = result.merged, result.merged_anomalous
    index = merged.asu_index
    columns = {
        "FreeR_flag": free_r_flags(index, result.space_group, result.unit_cell,
                                   seed=free_r_seed),
        "IMEAN": merged.intensity, "SIGIMEAN": merged.sigma, "N": merged.n_obs.astype(float),
    }
    if merged.amplitude is not None:
        columns["F"], columns["SIGF"] = merged.amplitude, merged.amplitude_sigma
    if anom is not None:
        plus, minus = friedel_positions(merged, anom)

        def take(values, where):
            out = np.full(len(index), np.nan)
            ok = where >= 0
            out[ok] = values[where[ok]]
            return out

        columns.update({
            "I(+)": take(anom.intensity, plus), "SIGI(+)": take(anom.sigma, plus),
            "I(-)": take(anom.intensity, minus), "SIGI(-)": take(anom.sigma, minus),
            "N(+)": np.nan_to_num(take(anom.n_obs.astype(float), plus)),
            "N(-)": np.nan_to_num(take(anom.n_obs.astype(float), minus)),
        })
        if anom.amplitude is not None:
            f_plus, sf_plus = take(anom.amplitude, plus), take(anom.amplitude_sigma, plus)
            f_minus, sf_minus = take(anom.amplitude, minus), take(anom.amplitude_sigma, minus)
            columns.update({"F(+)": f_plus, "SIGF(+)": sf_plus, "F(-)": f_minus,
                            "SIGF(-)": sf_minus,
                            "DANO": f_plus - f_minus,
                            "SIGDANO": np.sqrt(sf_plus**2 + sf_minus**2)})
    return index, columns


def log_statistics(result: MergeResult, log) -> None:
    """The log tables: by resolution shell, the CC1/2 resolution estimate, the summary."""
    stats = result.statistics
    if stats is None:
        return
    log.info("")
    log.info(stats.format_table())
    log.info("")
    log.info(stats.format_resolution_estimate())
    log.info("")
    log.info("Summary below: statistics of the merged intensities of "
             f"merging.method={stats.method}")
    log.info(stats.format_summary())
    if result.calibration is not None:
        from .calibration import format_calibration

        log.info("")
        log.info(format_calibration(result.calibration))
    if result.per_batch is not None:
        from .batch_statistics import format_batch_statistics

        log.info("")
        log.info(format_batch_statistics(result.per_batch))


def write_merge_outputs(result: MergeResult, params, log=None, program="dials.vmerge") -> list:
    """Write merged.mtz (merging.output.merged_mtz) and, if named, the unmerged MTZ.

    The unmerged MTZ holds the merged observations (partials combined, rows bad for scaling
    dropped) as dials.export writes them: I/g and sigma/g, g as SCALEUSED, one batch header
    per image of the valid ranges, so that iotbx.merging_statistics on it reproduces our
    statistics."""
    from ..mtz import batch_headers, history_line, write_merged_mtz, write_unmerged_mtz
    from .groups import map_indices_to_asu

    log = log or logging.getLogger(__name__)
    written = []
    history = [history_line(program, result.method)]
    output = _param(params, "merging.output", None)
    # merged_mtz=None means no merged MTZ (the PHIL help); only a missing scope means default
    merged_path = "merged.mtz" if output is None else getattr(output, "merged_mtz", "merged.mtz")
    if merged_path:
        index, columns = merged_mtz_columns(result, int(_param(params, "merging.seed", 0)))
        write_merged_mtz(merged_path, result.space_group, result.unit_cell, index, columns,
                         wavelength=result.wavelength,
                         title=f"dials.vmerge merged ({result.method})", history=history)
        written.append(merged_path)
    unmerged_path = _param(params, "merging.output.unmerged_mtz", None)
    if unmerged_path:
        obs = result.observations
        asu, _ = map_indices_to_asu(obs.miller_index, result.space_group, anomalous=False)
        batch = obs.batch
        headers = None
        if result.experiments is not None:
            headers = batch_headers(result.experiments, present=np.unique(batch))
        write_unmerged_mtz(unmerged_path, result.space_group, result.unit_cell, asu,
                           mtz_isym(obs.miller_index, result.space_group), batch,
                           obs.intensity, obs.sigma,
                           scale=obs.scale, scale_sigma=obs.scale_sigma, extra=obs.extra,
                           headers=headers, wavelength=result.wavelength, history=history)
        written.append(unmerged_path)
    for path in written:
        log.info(f"Written {path}")
    return written
