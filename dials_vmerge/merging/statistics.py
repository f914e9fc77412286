"""Merging statistics by resolution shell and overall, with iotbx.merging_statistics's
definitions (as dials.scale and dials.merge report them), computed by numba kernels.

Definitions (per shell and overall; observations with sigma <= 0 are dropped first):
- shells: `n_bins` equal-volume shells in d*^3 between the data's extreme d*^2, widened by
  1e-6 of the range (cctbx binning); shell i holds limits[i-1] <= d*^2 < limits[i].
- n_obs, n_uniq; multiplicity = mean observations per unique reflection;
  completeness = n_uniq / size of the complete set (systematic absences excluded) within the
  shell's d range, down to the shell data's d_min; capped at 1.
- <I>, <I/sigma>: over merged reflections (inverse-variance merge, sigma = sqrt(1/sum w)).
- Rmerge = sum|I - <I>| / sum I, Rmeas with sqrt(n/(n-1)), Rpim with sqrt(1/(n-1)); sums over
  unique reflections with n > 1 only.
- Ranom = sum |I+ - I-| / sum |<I+,I->| over Bijvoet pairs of the anomalous merge (which uses
  the larger of internal and external sigma, as cctbx's default merge does).
- CC1/2: Pearson correlation of the weighted means of a random half-split of each unique
  reflection with n > 1; cctbx's split recipe and random stream (Mersenne Twister seeded 1,
  53-bit doubles, restarted for every shell), so values equal cctbx's.
  Significance: one-sided Student-t test at `significance_level`.
- CCanom: the same split (unweighted) of the anomalous groups; correlation of
  I+ - I- over acentric pairs present in both halves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
from numba import njit

from .classical import SIGMA_DYNAMIC_RANGE, deviation_sums_kernel, inverse_variance_merge_kernel
from .groups import GroupedObservations, group_observations

BIN_RELATIVE_TOLERANCE = 1e-6
FP_EPS_DOUBLE = np.finfo(np.float64).eps
CCTBX_SPLIT_SEED = 1  # cctbx's split_unmerged seeds its mt19937 with seed + 1 = 1


# -- shells --------------------------------------------------------------------------------
def equal_volume_limits(unit_cell, miller_index, n_bins: int) -> np.ndarray:
    """Shell limits in d*^2 (n_bins + 1 values): equal volumes in d*^3 between the extreme
    d*^2 of the data, widened by 1e-6 of the range. Taken from cctbx's binning so boundary
    reflections fall exactly as in iotbx."""
    from cctbx import miller

    from .groups import _flex_indices

    binning = miller.binning(unit_cell, int(n_bins), _flex_indices(miller_index), 0, 0)
    d_ranges = [tuple(binning.bin_d_range(i)) for i in binning.range_used()]
    return np.array(binning.limits()), d_ranges


def shell_of(dstar_sq: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Shell number 0..n_bins-1 (limits[i] <= d*^2 < limits[i+1]); -1 outside."""
    shell = np.searchsorted(limits, dstar_sq, side="right") - 1
    shell[(dstar_sq < limits[0]) | (dstar_sq >= limits[-1])] = -1
    return shell


def _limit_as_d(limit: float) -> float:
    return 1.0 / math.sqrt(limit) if limit > 0 else -1.0


# -- random half-splits ----------------------------------------------------------------------
def cctbx_uniform_stream(n: int) -> np.ndarray:
    """The first n doubles of cctbx's split_unmerged random stream."""
    return np.random.RandomState(CCTBX_SPLIT_SEED).random_sample(max(int(n), 1))


@njit(cache=True)
def half_split_kernel(intensity, sigma, group_start, groups_in_order, uniforms, weighted):
    """Mean of a random half of each group (n > 1), in the order given; NaN for n < 2.

    For odd n the first half takes the extra observation when a draw is < 0.5; the first
    half is drawn by a partial Fisher-Yates shuffle, one draw per member."""
    n_sel = groups_in_order.shape[0]
    half_1 = np.full(n_sel, np.nan)
    half_2 = np.full(n_sel, np.nan)
    max_n = 1
    for k in range(n_sel):
        g = groups_in_order[k]
        n = group_start[g + 1] - group_start[g]
        if n > max_n:
            max_n = n
    values = np.empty(max_n)
    w = np.empty(max_n)
    u = 0
    for k in range(n_sel):
        g = groups_in_order[k]
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            continue
        for i in range(n):
            values[i] = intensity[start + i]
            w[i] = 1.0 / (sigma[start + i] * sigma[start + i]) if weighted else 1.0
        n_first = n // 2
        if 2 * n_first != n:
            if uniforms[u] < 0.5:
                n_first += 1
            u += 1
        sum_1 = 0.0
        weight_1 = 0.0
        for i in range(n_first):
            pick = i + min(n - i - 1, int(uniforms[u] * (n - i)))
            u += 1
            sum_1 += values[pick] * w[pick]
            weight_1 += w[pick]
            values[pick] = values[i]
            w[pick] = w[i]
        sum_2 = 0.0
        weight_2 = 0.0
        for i in range(n_first, n):
            sum_2 += values[i] * w[i]
            weight_2 += w[i]
        half_1[k] = sum_1 / weight_1
        half_2[k] = sum_2 / weight_2
    return half_1, half_2


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when undefined (fewer than 2 pairs or no spread), as cctbx."""
    if len(x) < 2:
        return 0.0
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    if denominator == 0:
        return 0.0
    return float(np.dot(dx, dy)) / denominator


def cc_significance(cc: float, n: int, level: float):
    """(significant, critical value) of a one-sided Student-t test of correlation cc."""
    if cc == -1 or n <= 2:
        return False, 0.0
    from scipy.stats import t as student_t

    t = float(student_t.ppf(1.0 - level, n - 2))
    critical = t / math.sqrt(n - 2 + t * t)
    return bool(cc > critical), critical


# -- Bijvoet pairs ---------------------------------------------------------------------------
def bijvoet_partner(asu_index: np.ndarray) -> np.ndarray:
    """For each group of an anomalous grouping: the group holding -h, or -1."""
    n = len(asu_index)
    if n == 0:
        return np.zeros(0, np.int64)
    key = _packed(asu_index)
    minus_key = _packed(-asu_index, reference=asu_index)
    order = np.argsort(key, kind="stable")
    position = np.searchsorted(key[order], minus_key)
    position = np.minimum(position, n - 1)
    found = key[order][position] == minus_key
    partner = np.where(found, order[position], -1)
    partner[np.arange(n) == partner] = -1  # (0,0,0) never occurs; be safe
    return partner.astype(np.int64)


def _packed(hkl, reference=None):
    span_source = np.concatenate([hkl, -hkl]) if reference is None else np.concatenate(
        [reference, -reference]
    )
    lo = span_source.min(axis=0).astype(np.int64)
    size = span_source.max(axis=0).astype(np.int64) - lo + 1
    h = hkl.astype(np.int64) - lo
    return (h[:, 0] * size[1] + h[:, 1]) * size[2] + h[:, 2]


def is_plus_hemisphere(asu_index: np.ndarray, space_group) -> np.ndarray:
    """True where an anomalous-ASU index lies in the non-anomalous ASU (the I(+) member)."""
    from .groups import map_indices_to_asu

    if len(asu_index) == 0:
        return np.zeros(0, bool)
    mapped, _ = map_indices_to_asu(asu_index, space_group, anomalous=False)
    return np.all(mapped == asu_index, axis=1)


# -- results ---------------------------------------------------------------------------------
@dataclass
class ShellStatistics:
    d_max: float
    d_min: float
    n_obs: int = 0
    n_uniq: int = 0
    multiplicity: float = 0.0
    completeness: float = 0.0
    i_mean: float = 0.0
    sigi_mean: float = 0.0
    i_over_sigma_mean: float = 0.0
    r_merge: Optional[float] = None
    r_meas: Optional[float] = None
    r_pim: Optional[float] = None
    r_anom: Optional[float] = None
    cc_half: float = 0.0
    cc_half_n_refl: int = 0
    cc_half_significance: Optional[bool] = None
    cc_half_critical_value: Optional[float] = None
    cc_anom: float = 0.0
    cc_anom_n_pairs: int = 0
    cc_anom_significance: Optional[bool] = None
    cc_anom_critical_value: Optional[float] = None
    anom_completeness: Optional[float] = None
    anom_multiplicity: Optional[float] = None

    def format(self) -> str:
        def value(x):
            return "% 7.3f" % x if x is not None else "   None"

        return "%6.2f %6.2f %6d %6d   %5.2f %6.2f  %8.1f  %6.1f  %s  %s  %s  %s  % 5.3f%s  % 5.3f%s" % (
            self.d_max, self.d_min, self.n_obs, self.n_uniq, self.multiplicity,
            self.completeness * 100, self.i_mean, self.i_over_sigma_mean,
            value(self.r_merge), value(self.r_meas), value(self.r_pim),
            value(self.r_anom) if self.r_anom is not None else "",
            self.cc_half, "*" if self.cc_half_significance else "",
            self.cc_anom, "*" if self.cc_anom_significance else "",
        )


TABLE_HEADER = (
    " d_max  d_min   #obs  #uniq   mult.  %comp       <I>  <I/sI>    r_mrg   r_meas    r_pim"
    "   r_anom   cc1/2   cc_ano"
)


@dataclass
class MergingStatistics:
    overall: ShellStatistics
    shells: List[ShellStatistics]
    anomalous: bool
    n_bins: int
    cc_half_overall: float = 0.0
    d_min_cc_half_fit: Optional[float] = None
    anomalous_statistics: Optional["MergingStatistics"] = None
    notes: dict = field(default_factory=dict)

    def format_table(self) -> str:
        lines = ["Merging statistics by resolution bin:", TABLE_HEADER]
        lines += [s.format() for s in self.shells]
        lines.append(self.overall.format())
        return "\n".join(lines)

    def format_summary(self) -> str:
        anomalous = self.anomalous_statistics
        columns = [("Overall", self.overall), ("Low", self.shells[0]), ("High", self.shells[-1])]
        anom_columns = None
        if anomalous is not None:
            anom_columns = [anomalous.overall, anomalous.shells[0], anomalous.shells[-1]]

        def row(label, values, fmt):
            cells = ["%8s" % (fmt % v if v is not None else "-") for v in values]
            return "%-40s%s" % (label, "".join(cells))

        stats = [c[1] for c in columns]
        lines = [
            "            -------------Summary of merging statistics--------------",
            "",
            "%-40s%s" % ("", "".join("%8s" % c[0] for c in columns)),
            row("High resolution limit", [s.d_min for s in stats], "%.2f"),
            row("Low resolution limit", [s.d_max for s in stats], "%.2f"),
            row("Completeness", [100 * s.completeness for s in stats], "%.1f"),
            row("Multiplicity", [s.multiplicity for s in stats], "%.1f"),
            row("I/sigma", [s.i_over_sigma_mean for s in stats], "%.1f"),
            row("Rmerge(I)", [s.r_merge for s in stats], "%.3f"),
        ]
        if anom_columns:
            lines.append(row("Rmerge(I+/-)", [s.r_merge for s in anom_columns], "%.3f"))
        lines.append(row("Rmeas(I)", [s.r_meas for s in stats], "%.3f"))
        if anom_columns:
            lines.append(row("Rmeas(I+/-)", [s.r_meas for s in anom_columns], "%.3f"))
        lines.append(row("Rpim(I)", [s.r_pim for s in stats], "%.3f"))
        if anom_columns:
            lines.append(row("Rpim(I+/-)", [s.r_pim for s in anom_columns], "%.3f"))
        lines.append(row("CC half", [s.cc_half for s in stats], "%.3f"))
        if anom_columns:
            lines.append(row("Anomalous completeness",
                             [None if s.anom_completeness is None else 100 * s.anom_completeness
                              for s in anom_columns], "%.1f"))
            lines.append(row("Anomalous multiplicity",
                             [s.anom_multiplicity for s in anom_columns], "%.1f"))
            lines.append(row("Anomalous correlation", [s.cc_anom for s in anom_columns], "%.3f"))
        lines.append(row("Total observations", [s.n_obs for s in stats], "%d"))
        lines.append(row("Total unique", [s.n_uniq for s in stats], "%d"))
        return "\n".join(lines)

    def format_resolution_estimate(self) -> str:
        if self.d_min_cc_half_fit is None:
            return "Resolution limit suggested from CC1/2 fit (limit CC1/2=0.3): not determined"
        return "Resolution limit suggested from CC1/2 fit (limit CC1/2=0.3): %.2f" % (
            self.d_min_cc_half_fit
        )

    def as_dict(self) -> dict:
        out = {
            "anomalous": self.anomalous,
            "n_bins": self.n_bins,
            "overall": asdict(self.overall),
            "shells": [asdict(s) for s in self.shells],
            "cc_half_overall": self.cc_half_overall,
            "d_min_cc_half_fit": self.d_min_cc_half_fit,
        }
        if self.anomalous_statistics is not None:
            out["anomalous_statistics"] = self.anomalous_statistics.as_dict()
        return _jsonable(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# -- the computation ---------------------------------------------------------------------------
class _Prepared:
    """Everything computed once over all groups, aggregated per shell afterwards."""

    def __init__(self, miller_index, intensity, sigma, space_group, unit_cell, anomalous):
        self.space_group = space_group
        self.unit_cell = unit_cell
        self.anomalous = anomalous
        self.groups = group_observations(miller_index, space_group, anomalous, unit_cell)
        g = self.groups
        self.i_sorted = g.gather(intensity)
        self.s_sorted = g.gather(sigma)
        self.mean, self.merged_sigma = inverse_variance_merge_kernel(
            self.i_sorted, self.s_sorted, g.group_start, SIGMA_DYNAMIC_RANGE, False
        )
        self.abs_dev, self.total = deviation_sums_kernel(self.i_sorted, g.group_start, self.mean)
        self.n = g.multiplicity
        self.group_d = _cctbx_d(unit_cell, g.asu_index)  # cctbx's rounding, for boundaries
        # The anomalous grouping for CCanom and Ranom.
        self.anom = group_observations(miller_index, space_group, True, unit_cell)
        a = self.anom
        self.ai_sorted = a.gather(intensity)
        self.as_sorted = a.gather(sigma)
        self.anom_mean, self.anom_sigma_internal = inverse_variance_merge_kernel(
            self.ai_sorted, self.as_sorted, a.group_start, SIGMA_DYNAMIC_RANGE, True
        )
        self.partner = bijvoet_partner(a.asu_index)
        self.plus = is_plus_hemisphere(a.asu_index, space_group) & (self.partner >= 0)
        self.uniforms = cctbx_uniform_stream(len(intensity))
        self._complete = None

    def complete_set_dstar_sq(self, d_min):
        """d*^2 of the complete set (this grouping's anomalous flag) down to d_min."""
        from cctbx import crystal, miller

        symmetry = crystal.symmetry(unit_cell=self.unit_cell, space_group=self.space_group)
        complete = miller.build_set(symmetry, self.anomalous, d_min=d_min * (1 - 1e-6))
        return (complete.d_spacings().data().as_numpy_array(),
                np.sqrt(complete.d_star_sq().data().as_numpy_array()))


def _shell_statistics(prep: _Prepared, group_sel, anom_sel, d_max_min, level, complete_dss,
                      anom_complete_dss):
    g = prep.groups
    n = prep.n[group_sel]
    stats = ShellStatistics(d_max=0.0, d_min=0.0)
    if len(n) == 0:
        return stats
    data_d = prep.group_d[group_sel]
    data_d_max, data_d_min = float(data_d.max()), float(data_d.min())
    if d_max_min is None:
        d_max_min = (data_d_max, data_d_min)
    stats.d_max, stats.d_min = d_max_min
    stats.n_obs = int(n.sum())
    stats.n_uniq = int(len(n))
    # Completeness against the complete set within the shell, down to the data's d_min.
    d_complete, d_star_complete = complete_dss
    keep = d_complete >= data_d_min * (1 - FP_EPS_DOUBLE)
    if stats.d_max > 0:
        keep &= d_star_complete >= 1.0 / stats.d_max
    if stats.d_min > 0:
        keep &= d_star_complete <= 1.0 / stats.d_min
    n_expected = int(keep.sum())
    stats.completeness = min(stats.n_uniq / n_expected, 1.0) if n_expected else 0.0
    stats.multiplicity = float(n.mean())
    mean = prep.mean[group_sel]
    msig = prep.merged_sigma[group_sel]
    stats.i_mean = float(mean.mean())
    stats.sigi_mean = float(msig.mean())
    positive = msig > 0
    stats.i_over_sigma_mean = float((mean[positive] / msig[positive]).mean()) if positive.any() else 0.0
    multi = n > 1
    denominator = float(prep.total[group_sel][multi].sum())
    abs_dev = prep.abs_dev[group_sel][multi]
    nm = n[multi].astype(np.float64)
    if denominator == 0:
        stats.r_merge = stats.r_meas = stats.r_pim = 0.0
    else:
        stats.r_merge = float(abs_dev.sum()) / denominator
        stats.r_meas = float((np.sqrt(nm / (nm - 1)) * abs_dev).sum()) / denominator
        stats.r_pim = float((np.sqrt(1.0 / (nm - 1)) * abs_dev).sum()) / denominator
    # CC1/2 on this grouping, fresh random stream.
    order = np.flatnonzero(group_sel) if group_sel.dtype == bool else np.asarray(group_sel)
    h1, h2 = half_split_kernel(prep.i_sorted, prep.s_sorted, g.group_start,
                               order.astype(np.int64), prep.uniforms, True)
    ok = ~np.isnan(h1)
    stats.cc_half = pearson(h1[ok], h2[ok])
    stats.cc_half_n_refl = int(ok.sum())
    if level is not None:
        stats.cc_half_significance, stats.cc_half_critical_value = cc_significance(
            stats.cc_half, stats.cc_half_n_refl, level)
    # CCanom and Ranom on the anomalous grouping.
    a = prep.anom
    anom_order = np.flatnonzero(anom_sel).astype(np.int64)
    a1, a2 = half_split_kernel(prep.ai_sorted, prep.as_sorted, a.group_start, anom_order,
                               prep.uniforms, False)
    split_1 = np.full(a.n_groups, np.nan)
    split_2 = np.full(a.n_groups, np.nan)
    split_1[anom_order] = a1
    split_2[anom_order] = a2
    plus = anom_order[prep.plus[anom_order]]
    minus = prep.partner[plus]
    in_shell = np.zeros(a.n_groups, bool)
    in_shell[anom_order] = True
    pair_ok = in_shell[minus] if len(minus) else np.zeros(0, bool)
    plus, minus = plus[pair_ok], minus[pair_ok]
    both = ~np.isnan(split_1[plus]) & ~np.isnan(split_1[minus])
    d1 = split_1[plus][both] - split_1[minus][both]
    d2 = split_2[plus][both] - split_2[minus][both]
    stats.cc_anom = pearson(d1, d2)
    stats.cc_anom_n_pairs = int(both.sum())
    if level is not None:
        stats.cc_anom_significance, stats.cc_anom_critical_value = cc_significance(
            stats.cc_anom, stats.cc_anom_n_pairs, level)
    if len(plus):
        i_plus, i_minus = prep.anom_mean[plus], prep.anom_mean[minus]
        w_plus = 1.0 / prep.anom_sigma_internal[plus] ** 2
        w_minus = 1.0 / prep.anom_sigma_internal[minus] ** 2
        average = (w_plus * i_plus + w_minus * i_minus) / (w_plus + w_minus)
        denominator = float(np.abs(average).sum())
        stats.r_anom = float(np.abs(i_plus - i_minus).sum()) / denominator if denominator > 0 else None
    else:
        stats.r_anom = None
    if prep.anomalous and anom_complete_dss is not None:
        acentric = ~g.centric[group_sel]
        pairs = plus.size
        # cctbx: Bijvoet pairs / acentrics of the non-anomalous complete set in the range
        d_acentric, d_star_acentric = anom_complete_dss
        keep = d_acentric >= stats.d_min * (1 - 1e-6)
        if stats.d_max > 0:
            keep &= d_star_acentric >= 1.0 / stats.d_max
        n_acentric_expected = int(keep.sum())
        stats.anom_completeness = min(pairs / n_acentric_expected, 1.0) if n_acentric_expected else 0
        stats.anom_multiplicity = float(n[acentric].mean()) if acentric.any() else None
    return stats


def merging_statistics(
    miller_index,
    intensity,
    sigma,
    space_group,
    unit_cell,
    n_bins: int = 20,
    anomalous: bool = False,
    significance_level: Optional[float] = 0.01,
    with_anomalous_table: bool = False,
) -> MergingStatistics:
    """Statistics of unmerged scaled intensities (I/g, sigma/g), overall and by shell."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    unit_cell = symmetry_compatible_cell(unit_cell, space_group)
    limits, d_ranges = equal_volume_limits(unit_cell, miller_index, n_bins)
    positive = sigma > 0
    prep = _Prepared(miller_index[positive], intensity[positive], sigma[positive], space_group,
                     unit_cell, anomalous)
    g, a = prep.groups, prep.anom
    complete_dss = prep.complete_set_dstar_sq(float(prep.group_d.min()))
    anom_complete_dss = None
    if anomalous:
        complete_acentric = _acentric_complete(prep, float(prep.group_d.min()))
        anom_complete_dss = complete_acentric
    all_groups = np.ones(g.n_groups, bool)
    all_anom = np.ones(a.n_groups, bool)
    overall = _shell_statistics(prep, all_groups, all_anom, None, significance_level,
                                complete_dss, anom_complete_dss)
    group_shell = shell_of(g.dstar_sq, limits)
    anom_shell = shell_of(a.dstar_sq, limits)
    shells = []
    for b in range(n_bins):
        d_range = d_ranges[b]
        sel = group_shell == b
        if not sel.any():
            shells.append(ShellStatistics(d_max=d_range[0], d_min=d_range[1]))
            continue
        shells.append(_shell_statistics(prep, sel, anom_shell == b, d_range, significance_level,
                                        complete_dss, anom_complete_dss))
    weights = np.array([s.cc_half_n_refl for s in shells], dtype=np.float64)
    values = np.array([s.cc_half for s in shells])
    cc_half_overall = float((weights * values).sum() / weights.sum()) if weights.sum() else 0.0
    result = MergingStatistics(
        overall=overall, shells=shells, anomalous=anomalous, n_bins=n_bins,
        cc_half_overall=cc_half_overall,
    )
    result.d_min_cc_half_fit = cc_half_resolution_estimate(result)
    if with_anomalous_table and not anomalous:
        result.anomalous_statistics = merging_statistics(
            miller_index, intensity, sigma, space_group, unit_cell, n_bins, True,
            significance_level, False)
    return result


def _acentric_complete(prep: _Prepared, d_min):
    """d*^2 of the acentric members of the non-anomalous complete set."""
    from cctbx import crystal, miller

    symmetry = crystal.symmetry(unit_cell=prep.unit_cell, space_group=prep.space_group)
    complete = miller.build_set(symmetry, False, d_min=d_min * (1 - 1e-6))
    acentric = ~complete.centric_flags().data().as_numpy_array()
    return (complete.d_spacings().data().as_numpy_array()[acentric],
            np.sqrt(complete.d_star_sq().data().as_numpy_array())[acentric])


def symmetry_compatible_cell(unit_cell, space_group):
    """The cell as cctbx's crystal.symmetry uses it: averaged to obey the space group (as a
    miller array built by DIALS has it)."""
    from cctbx import crystal

    return crystal.symmetry(unit_cell=unit_cell, space_group=space_group).unit_cell()


def _cctbx_d(unit_cell, asu_index):
    from .groups import _flex_indices

    if len(asu_index) == 0:
        return np.zeros(0)
    return unit_cell.d(_flex_indices(asu_index)).as_numpy_array()


# -- resolution estimate -----------------------------------------------------------------------
def cc_half_resolution_estimate(stats: MergingStatistics, limit: float = 0.3):
    """d at which a tanh fit of CC1/2 against d*^2 falls to `limit` (weighted by n)."""
    shells = [s for s in stats.shells if s.cc_half_n_refl > 0 and s.d_min > 0]
    if len(shells) < 3:
        return None
    s2 = np.array([1.0 / s.d_min**2 for s in shells])
    cc = np.array([s.cc_half for s in shells])
    weights = np.array([math.sqrt(s.cc_half_n_refl) for s in shells])
    if np.all(cc >= limit):
        return float(min(s.d_min for s in shells))

    d0, r = _fit_tanh(s2, cc, weights)
    # cc = limit at s^2 = d0 + r artanh(1 - 2 limit)
    s2_limit = d0 + r * math.atanh(1.0 - 2.0 * limit)
    if not s2_limit > 0:
        return None
    s2_limit = min(s2_limit, s2.max())
    return float(1.0 / math.sqrt(s2_limit))


def _fit_tanh(s2, cc, weights):
    """Weighted least squares fit of cc = (1 - tanh((s2 - d0)/r))/2: a grid search, then
    Gauss-Newton steps with an explicit 2x2 solve (no LAPACK: tiny problem)."""
    span = max(s2.max() - s2.min(), 1e-12)
    d0_grid = np.linspace(s2.min() - 0.5 * span, s2.max() + 1.5 * span, 201)
    r_grid = span * np.logspace(-3, 1, 121)
    model = 0.5 * (1 - np.tanh((s2[None, None, :] - d0_grid[:, None, None]) / r_grid[None, :, None]))
    cost = ((weights * (model - cc)) ** 2).sum(axis=2)
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    d0, r = d0_grid[i], r_grid[j]
    for _ in range(50):
        z = (s2 - d0) / r
        sech2 = 1 - np.tanh(z) ** 2
        res = weights * (0.5 * (1 - np.tanh(z)) - cc)
        j_d0 = weights * 0.5 * sech2 / r
        j_r = weights * 0.5 * sech2 * z / r
        a11, a12, a22 = (j_d0 * j_d0).sum(), (j_d0 * j_r).sum(), (j_r * j_r).sum()
        b1, b2 = -(j_d0 * res).sum(), -(j_r * res).sum()
        det = a11 * a22 - a12 * a12
        if not det > 0:
            break
        step_d0 = (a22 * b1 - a12 * b2) / det
        step_r = (a11 * b2 - a12 * b1) / det
        new_r = r + step_r
        if not new_r > 0:
            break
        d0, r = d0 + step_d0, new_r
        if abs(step_d0) < 1e-12 * span and abs(step_r) < 1e-12 * span:
            break
    return d0, r
