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
- With anomalous=True (I+ and I- apart), over Bijvoet pairs of the merged data
  (inverse-variance merge): dF/F = sqrt(2 <(F+ - F-)^2> / <F+^2 + F-^2>) over pairs with
  both I > 0 (F = sqrt(I)); dI/s(dI) = <|I+ - I-|> / <sqrt(s+^2 + s-^2)>; and, overall only,
  the anomalous normal probability plot: the sorted (I+ - I-)/s(dI) against the normal
  quantiles Phi^-1((i - 1/2)/n), least-squares slope over the points with |quantile| < 0.9
  (dials' "Anomalous slope"), and over all points.
- Resolution estimate (dials.scale's "Resolution limit suggested from CC1/2 fit"): over the
  shells whose CC1/2 is significant and positive, in d*^2 of the shells' d_min; if none falls
  to 0.3 the data's limit, else a tanh fit (scitbx curve_fitting, refitted without points
  more than 6 interquartile ranges off) and the first crossing of 0.3 by the fitted values
  (linear between shells, scanned from high resolution). When it lies more than 0.005 A
  inside the data, the statistics are recomputed on the data cut there ("Suggested").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
from numba import njit, prange

from ..kernels.size_dispatch import parallel_when_large
from .classical import SIGMA_DYNAMIC_RANGE, deviation_sums, merge_sums
from .groups import Groupings, per_index_chunks

BIN_RELATIVE_TOLERANCE = 1e-6
FP_EPS_DOUBLE = np.finfo(np.float64).eps
CCTBX_SPLIT_SEED = 1  # cctbx's split_unmerged seeds its mt19937 with seed + 1 = 1


# -- shells --------------------------------------------------------------------------------
def equal_volume_limits(unit_cell, miller_index, n_bins: int) -> np.ndarray:
    """Shell limits in d*^2 (n_bins + 1 values): equal volumes in d*^3 between the extreme
    d*^2 of the data, widened by 1e-6 of the range. Taken from cctbx's binning so boundary
    reflections fall exactly as in iotbx; cctbx's binning reads only the extreme d*^2 of the
    indices, so it is given the two indices where they lie (found slice by slice) rather
    than a flex copy of every index."""
    from cctbx import miller

    from .groups import flex_indices

    miller_index = np.asarray(miller_index).reshape(-1, 3)
    if len(miller_index):
        d_star_sq = per_index_chunks(miller_index, unit_cell.d_star_sq)
        miller_index = miller_index[[int(np.argmin(d_star_sq)), int(np.argmax(d_star_sq))]]
        del d_star_sq
    binning = miller.binning(unit_cell, int(n_bins), flex_indices(miller_index), 0, 0)
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


def cctbx_draws_needed(groups) -> int:
    """The most draws half_split_kernel can take from the stream for all groups: per group
    with n > 1, one per member of the first half (n // 2, or n // 2 + 1 for odd n) and, for
    odd n, one for that choice."""
    n = groups.multiplicity
    n = n[n > 1]
    return int((n // 2 + 2 * (n % 2)).sum())


@njit(cache=True)
def _draw_first_half(rows, n, uniforms, u):
    """Reorder rows[:n] so that rows[:n_first] is the random first half, in draw order, and
    rows[n_first:n] the second; returns (n_first, next draw). For odd n the first half takes
    the extra observation when a draw is < 0.5; the first half is drawn by a partial
    Fisher-Yates shuffle, one draw per member (cctbx's split)."""
    n_first = n // 2
    if u + n_first + 2 * (n - 2 * n_first) > uniforms.shape[0]:
        raise ValueError("half split: too few random numbers")
    if 2 * n_first != n:
        if uniforms[u] < 0.5:
            n_first += 1
        u += 1
    for i in range(n_first):
        pick = i + min(n - i - 1, int(uniforms[u] * (n - i)))
        u += 1
        picked = rows[pick]
        rows[pick] = rows[i]
        rows[i] = picked
    return n_first, u


@njit(cache=True)
def _largest_group(group_start, groups_in_order):
    max_n = 1
    for k in range(groups_in_order.shape[0]):
        g = groups_in_order[k]
        n = group_start[g + 1] - group_start[g]
        if n > max_n:
            max_n = n
    return max_n


@njit(cache=True)
def _split_means_of_order(intensity, sigma, permutation, group_start, order, lo, hi,
                          uniforms, weighted, rows, half_1, half_2, draw_starts):
    """half_split_kernel's means of the groups order[lo:hi] into half_1/half_2[lo:hi]. Group
    k's draws start at stream position draw_starts[k] when draw_starts has an entry per
    group of the order (an MPI rank's own groups, whose offsets into the one stream come
    from the multiplicities of all groups: merging/rank_merge.py); with draw_starts empty,
    the stream restarts (u = 0) for order[lo:hi]. rows: scratch of the largest group."""
    given_starts = draw_starts.shape[0] > 0
    u = np.int64(0)  # int64, not Literal[int](0): a literal argument compiles the helper twice
    for k in range(lo, hi):
        g = order[k]
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            continue
        for i in range(n):
            rows[i] = permutation[start + i]
        if given_starts:
            u = draw_starts[k]
        n_first, u = _draw_first_half(rows, n, uniforms, u)
        sum_1 = 0.0
        weight_1 = 0.0
        sum_2 = 0.0
        weight_2 = 0.0
        for i in range(n):
            row = rows[i]
            w = 1.0 / (sigma[row] * sigma[row]) if weighted else 1.0
            if i < n_first:
                sum_1 += intensity[row] * w
                weight_1 += w
            else:
                sum_2 += intensity[row] * w
                weight_2 += w
        half_1[k] = sum_1 / weight_1
        half_2[k] = sum_2 / weight_2


@njit(cache=True)
def half_split_kernel(intensity, sigma, permutation, group_start, groups_in_order, uniforms,
                      weighted):
    """Mean of a random half of each group (n > 1), in the order given; NaN for n < 2.
    Observations are read in the caller's row order through `permutation` (no sorted copy);
    the halves are those of _draw_first_half."""
    n_sel = groups_in_order.shape[0]
    half_1 = np.full(n_sel, np.nan)
    half_2 = np.full(n_sel, np.nan)
    rows = np.empty(_largest_group(group_start, groups_in_order), np.int64)
    _split_means_of_order(intensity, sigma, permutation, group_start, groups_in_order, 0,
                          n_sel, uniforms, weighted, rows, half_1, half_2,
                          np.empty(0, np.int64))
    return half_1, half_2


@njit(cache=True)
def half_means_from_draw_starts(intensity, sigma, permutation, group_start, groups_in_order,
                                uniforms, weighted, draw_starts):
    """half_split_kernel with group k's draws starting at stream position draw_starts[k]
    (see _split_means_of_order)."""
    n_sel = groups_in_order.shape[0]
    half_1 = np.full(n_sel, np.nan)
    half_2 = np.full(n_sel, np.nan)
    rows = np.empty(_largest_group(group_start, groups_in_order), np.int64)
    _split_means_of_order(intensity, sigma, permutation, group_start, groups_in_order, 0,
                          n_sel, uniforms, weighted, rows, half_1, half_2, draw_starts)
    return half_1, half_2


@parallel_when_large
def half_split_orders_kernel(intensity, sigma, permutation, group_start, orders, order_start,
                             worker_orders, worker_start, uniforms, weighted):
    """half_split_kernel of several group orders at once (order j: orders[order_start[j]:
    order_start[j + 1]], its stream restarted), concatenated as `orders`. Worker w takes the
    orders worker_orders[worker_start[w]:worker_start[w + 1]]; each order's means are those
    of its own half_split_kernel call whichever worker takes it."""
    half_1 = np.full(orders.shape[0], np.nan)
    half_2 = np.full(orders.shape[0], np.nan)
    largest = _largest_group(group_start, orders)
    for w in prange(worker_start.shape[0] - 1):
        rows = np.empty(largest, np.int64)
        for t in range(worker_start[w], worker_start[w + 1]):
            j = worker_orders[t]
            _split_means_of_order(intensity, sigma, permutation, group_start, orders,
                                  order_start[j], order_start[j + 1], uniforms, weighted,
                                  rows, half_1, half_2, np.empty(0, np.int64))
    return half_1, half_2


@njit(cache=True)
def half_split_assignment_kernel(permutation, group_start, groups_in_order, uniforms,
                                 n_rows):
    """The halves half_split_kernel draws, as a label per observation row (1 or 2; 0 for rows
    of groups not in the order or with n < 2): the same draws from the same stream, so a
    method's merge of each half sees exactly the split the inverse-variance CC1/2 uses."""
    return half_labels_from_draw_starts(permutation, group_start, groups_in_order, uniforms,
                                        n_rows, np.empty(0, np.int64))


@njit(cache=True)
def half_labels_from_draw_starts(permutation, group_start, groups_in_order, uniforms, n_rows,
                                 draw_starts):
    """half_split_assignment_kernel with the draw starts of half_means_from_draw_starts."""
    given_starts = draw_starts.shape[0] > 0
    label = np.zeros(n_rows, np.int8)
    rows = np.empty(_largest_group(group_start, groups_in_order), np.int64)
    u = np.int64(0)
    for k in range(groups_in_order.shape[0]):
        g = groups_in_order[k]
        start = group_start[g]
        n = group_start[g + 1] - start
        if n < 2:
            continue
        for i in range(n):
            rows[i] = permutation[start + i]
        if given_starts:
            u = draw_starts[k]
        n_first, u = _draw_first_half(rows, n, uniforms, u)
        for i in range(n):
            label[rows[i]] = 1 if i < n_first else 2
    return label


def _half_means(prep, groups, order, weighted):
    """Means of the two random halves of each group in `order` (NaN for n < 2): weighted or
    plain means (cctbx), or, with a method merger, that method's merge of each half."""
    if getattr(prep, "distributed", False):  # MPI ranks' own rows (merging/rank_merge.py)
        return prep.half_means(groups, order, weighted)
    if prep.merger is None:
        halves = prep.shell_halves(groups, order, weighted)
        if halves is not None:
            return halves
        return half_split_kernel(prep.intensity, prep.sigma, groups.permutation,
                                 groups.group_start, order, prep.uniforms, weighted)
    from .lookup import find_indices

    label = half_split_assignment_kernel(groups.permutation, groups.group_start, order,
                                         prep.uniforms, len(prep.intensity))
    halves = []
    for half in (1, 2):
        keep = label == half
        part = groups.subset(keep)
        means = prep.merger.half_means(part, prep.intensity[keep], prep.sigma[keep])
        out = np.full(len(order), np.nan)
        where = find_indices(groups.asu_index[order], part.asu_index)
        found = where >= 0
        out[found] = means[where[found]]
        halves.append(out)
    multiplicity = groups.multiplicity[order]
    for out in halves:
        out[multiplicity < 2] = np.nan
    return halves[0], halves[1]


def _half_means_of_orders(prep, groups, orders, weighted):
    """{j: (half_1, half_2) of orders[j]} from one half_split_orders_kernel call; the
    orders go to the threads largest first, each to the least loaded (by groups)."""
    import numba

    sizes = np.array([o.size for o in orders], dtype=np.int64)
    order_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_workers = max(1, min(numba.get_num_threads(), len(orders)))
    load = np.zeros(n_workers, dtype=np.int64)
    assigned = [[] for _ in range(n_workers)]
    for j in np.argsort(-sizes, kind="stable"):
        w = int(np.argmin(load))
        assigned[w].append(int(j))
        load[w] += sizes[j]
    worker_orders = np.array([j for a in assigned for j in a], dtype=np.int64)
    worker_start = np.concatenate([[0], np.cumsum([len(a) for a in assigned])]).astype(np.int64)
    half_1, half_2 = half_split_orders_kernel(
        prep.intensity, prep.sigma, groups.permutation, groups.group_start,
        np.concatenate(orders) if orders else np.zeros(0, np.int64), order_start,
        worker_orders, worker_start, prep.uniforms, weighted)
    return {j: (half_1[order_start[j]:order_start[j + 1]],
                half_2[order_start[j]:order_start[j + 1]]) for j in range(len(orders))}


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
    # scipy.stats.t.ppf is this function; scipy.stats itself costs ~25 MB to import
    from scipy.special import stdtrit

    t = float(stdtrit(n - 2, 1.0 - level))
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


def bijvoet_partner_of(groups) -> np.ndarray:
    """bijvoet_partner of a grouping's ASU indices, computed once per grouping."""
    if "bijvoet_partner" not in groups.derived:
        partner = bijvoet_partner(groups.asu_index)
        partner.setflags(write=False)  # shared by every caller
        groups.derived["bijvoet_partner"] = partner
    return groups.derived["bijvoet_partner"]


def plus_hemisphere_of(groups, space_group) -> np.ndarray:
    """is_plus_hemisphere of a grouping's ASU indices, computed once per grouping and space
    group."""
    key = ("plus_hemisphere", space_group.type().hall_symbol())
    if key not in groups.derived:
        plus = is_plus_hemisphere(groups.asu_index, space_group)
        plus.setflags(write=False)  # shared by every caller
        groups.derived[key] = plus
    return groups.derived[key]


def _packed(hkl, reference=None):
    from .lookup import column_bounds

    # the box of the rows and their negatives (of `reference` if given): the column bounds
    # of [r, -r] without forming it
    low, high = column_bounds(hkl if reference is None else reference)
    lo = np.minimum(low, -high)
    size = np.maximum(high, -low) - lo + 1
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
    anom_signal: Optional[float] = None  # dF/F
    delta_i_mean_over_sig_delta_i_mean: Optional[float] = None  # dI/s(dI)
    anom_probability_slope: Optional[float] = None  # |quantile| < 0.9 (dials' value)
    anom_probability_intercept: Optional[float] = None
    anom_probability_n_pairs: Optional[int] = None
    anom_probability_slope_all_data: Optional[float] = None

    def format(self) -> str:
        # An undefined value (no Friedel pairs for r_anom/CCanom, fewer than two reflections
        # with a half-split pair for CC1/2) is shown as n/a in its column, never as 0.000 or
        # a gap that shifts the columns after it (iotbx.merging_statistics does both).
        def value(x):
            return "% 7.3f" % x if x is not None and math.isfinite(x) else "    n/a"

        def correlation(x, n, significant):
            if x is None or not math.isfinite(x) or n is None or n < 2:
                return "   n/a"
            return "% 5.3f%s" % (x, "*" if significant else "")

        # otherwise iotbx's format, character for character (the * of significance included)
        return ("%6.2f %6.2f %6d %6d   %5.2f %6.2f  %8.1f  %6.1f  %s  %s  %s  %s  %s  %s" % (
            self.d_max, self.d_min, self.n_obs, self.n_uniq, self.multiplicity,
            self.completeness * 100, self.i_mean, self.i_over_sigma_mean,
            value(self.r_merge), value(self.r_meas), value(self.r_pim), value(self.r_anom),
            correlation(self.cc_half, self.cc_half_n_refl, self.cc_half_significance),
            correlation(self.cc_anom, self.cc_anom_n_pairs, self.cc_anom_significance),
        )).rstrip()


TABLE_HEADER = (
    " d_max  d_min   #obs  #uniq   mult.  %comp       <I>  <I/sI>    r_mrg   r_meas    r_pim"
    "   r_anom   cc1/2   cc_ano"
)


SUMMARY_FORMATS = [
    ("High resolution limit", " %7.2f"), ("Low resolution limit", " %7.2f"),
    ("Completeness", "%7.1f"), ("Multiplicity", "%7.1f"), ("I/sigma", "%7.1f"),
    ("Rmerge(I)", "%7.3f"), ("Rmerge(I+/-)", "%7.3f"), ("Rmeas(I)", "%7.3f"),
    ("Rmeas(I+/-)", "%7.3f"), ("Rpim(I)", "%7.3f"), ("Rpim(I+/-)", "%7.3f"),
    ("CC half", "%7.3f"), ("Anomalous completeness", "%7.1f"),
    ("Anomalous multiplicity", "%7.1f"), ("Anomalous correlation", "%7.3f"),
    ("Anomalous slope", "%7.3f"), ("dF/F", "%7.3f"), ("dI/s(dI)", "%7.3f"),
    ("Total observations", "%7d"), ("Total unique", "%7d"),
]
# summary row -> ShellStatistics attribute (dials.report.analysis.table_1_stats)
SUMMARY_ROWS = {
    "High resolution limit": "d_min", "Low resolution limit": "d_max",
    "Completeness": "completeness", "Multiplicity": "multiplicity",
    "I/sigma": "i_over_sigma_mean", "Rmerge(I)": "r_merge", "Rmeas(I)": "r_meas",
    "Rpim(I)": "r_pim", "CC half": "cc_half", "Total observations": "n_obs",
    "Total unique": "n_uniq",
}
SUMMARY_ANOMALOUS_ROWS = {
    "Rmerge(I+/-)": "r_merge", "Rmeas(I+/-)": "r_meas", "Rpim(I+/-)": "r_pim",
    "Anomalous completeness": "anom_completeness", "Anomalous multiplicity": "multiplicity",
    "Anomalous correlation": "cc_anom",
}
SUMMARY_SINGLE_ROWS = {  # overall anomalous values, one column
    "Anomalous slope": "anom_probability_slope", "dF/F": "anom_signal",
    "dI/s(dI)": "delta_i_mean_over_sig_delta_i_mean",
}
CUT_TOLERANCE_A = 0.005  # dials.scale reports a cut only this far inside the data


@dataclass
class MergingStatistics:
    overall: ShellStatistics
    shells: List[ShellStatistics]
    anomalous: bool
    n_bins: int
    cc_half_overall: float = 0.0
    d_min_cc_half_fit: Optional[float] = None
    anomalous_statistics: Optional["MergingStatistics"] = None
    # The same statistics on the data cut at d_min_cc_half_fit, when that lies inside the data
    cut_statistics: Optional["MergingStatistics"] = None
    notes: dict = field(default_factory=dict)
    method: str = "classical"  # whose merged intensities the statistics describe

    def format_table(self) -> str:
        lines = [f"Merging statistics by resolution bin (merging.method={self.method}):",
                 TABLE_HEADER]
        lines += [s.format() for s in self.shells]
        lines.append(self.overall.format())
        return "\n".join(lines)

    def summary_values(self) -> dict:
        """Row label -> values of the "Summary of merging statistics" table: columns
        Overall/Low/High, or Suggested/Low/High/Overall when a cut is suggested (the first
        three on the cut data); single-valued anomalous rows have one value. Rows whose first
        value is missing are left out, as dials does; anomalous rows need the anomalous
        statistics (not computed for centric space groups)."""
        cut = self.cut_statistics

        def columns(full, selected):
            if full is None:
                return None
            if cut is not None:
                return ([selected.overall, selected.shells[0], selected.shells[-1],
                         full.overall] if selected is not None else None)
            return [full.overall, full.shells[0], full.shells[-1]]

        out = {}

        def add(rows, shells):
            if shells is None:
                return
            for label, attribute in rows.items():
                values = [getattr(s, attribute) for s in shells]
                if "completeness" in attribute:
                    values = [100 * v if v else None for v in values]
                if values[0] is not None:
                    out[label] = values

        add(SUMMARY_ROWS, columns(self, cut))
        anomalous = self.anomalous_statistics
        if anomalous is not None:
            cut_anomalous = cut.anomalous_statistics if cut is not None else None
            source = cut_anomalous if cut is not None else anomalous
            if source is not None:
                for label, attribute in SUMMARY_SINGLE_ROWS.items():
                    value = getattr(source.overall, attribute)
                    if value is not None:
                        out[label] = [value]
            add(SUMMARY_ANOMALOUS_ROWS, columns(anomalous, cut_anomalous))
        return out

    def format_summary(self) -> str:
        values = self.summary_values()
        n_columns = 4 if self.cut_statistics is not None else 3
        header = "Suggested   Low    High  Overall" if n_columns == 4 else " Overall    Low     High"
        lines = [
            "            -------------Summary of merging statistics--------------",
            "",
            "".ljust(44) + header,
        ]
        for label, fmt in SUMMARY_FORMATS:
            if label not in values:
                continue
            row = list(values[label])
            if len(row) == 1:
                row += [None] * (n_columns - 1)
            formats = [fmt] + [fmt.strip()] * (len(row) - 1)
            cells = [(f % v) if v is not None else " " * len(f % 0) for f, v in zip(formats, row)]
            lines.append(label.ljust(44) + " ".join(cells))
        return "\n".join(lines)

    def format_resolution_estimate(self) -> str:
        if self.d_min_cc_half_fit is None:
            return "Resolution limit suggested from CC1/2 fit (limit CC1/2=0.3): not determined"
        return "Resolution limit suggested from CC1/2 fit (limit CC1/2=0.3): %.2f" % (
            self.d_min_cc_half_fit
        )

    def as_dict(self) -> dict:
        out = {
            "method": self.method,
            "anomalous": self.anomalous,
            "n_bins": self.n_bins,
            "overall": asdict(self.overall),
            "shells": [asdict(s) for s in self.shells],
            # cctbx's cc_one_half_overall: the shells' CC1/2 weighted by their reflections;
            # not the overall CC1/2 (overall.cc_half, the summary's "CC half")
            "cc_half_mean_over_shells": self.cc_half_overall,
            "d_min_cc_half_fit": self.d_min_cc_half_fit,
        }
        if self.anomalous_statistics is not None:
            out["anomalous_statistics"] = self.anomalous_statistics.as_dict()
        if self.cut_statistics is not None:
            out["cut_statistics"] = self.cut_statistics.as_dict()
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
    """Everything computed once over all groups, aggregated per shell afterwards. Holds
    per-group arrays only: observations are read through the groupings' permutations, and
    the sorted copies the merge kernels need are dropped once they have run."""

    def __init__(self, intensity, sigma, space_group, unit_cell, anomalous, groupings,
                 merger=None):
        self.merger = merger
        self.space_group = space_group
        self.unit_cell = unit_cell
        self.anomalous = anomalous
        self.intensity = intensity
        self.sigma = sigma
        # The anomalous grouping for CCanom and Ranom (the same one when anomalous); made
        # first, so that the other is derived from it (groups.non_anomalous_from_anomalous)
        self.anom = groupings.get(True, unit_cell)
        self.groups = groupings.get(anomalous, unit_cell)
        g = self.groups
        a = self.anom
        i_sorted = g.gather(intensity)
        s_sorted = g.gather(sigma)
        if merger is None:
            self.mean, self.merged_sigma = merge_sums(
                i_sorted, s_sorted, g.group_start, SIGMA_DYNAMIC_RANGE, False,
                sources=(g, intensity, sigma), pass_name="merging statistics"
            )
        else:
            self.mean, self.merged_sigma = merger.merge(g, intensity, sigma)
        self.abs_dev, self.total = deviation_sums(i_sorted, g.group_start, self.mean,
                                                  sources=(g, intensity))
        if a is not g:
            del i_sorted, s_sorted
            i_sorted = a.gather(intensity)
            s_sorted = a.gather(sigma)
        if merger is None:
            self.anom_mean, self.anom_sigma_internal = merge_sums(
                i_sorted, s_sorted, a.group_start, SIGMA_DYNAMIC_RANGE, True,
                sources=(a, intensity, sigma), pass_name="merging statistics"
            )
        else:
            self.anom_mean, self.anom_sigma_internal = merger.merge(a, intensity, sigma)
        del i_sorted, s_sorted
        self.n = g.multiplicity
        self.group_d = _cctbx_d(unit_cell, g.asu_index)  # cctbx's rounding, for boundaries
        self.partner = bijvoet_partner_of(a)
        self.plus = plus_hemisphere_of(a, space_group) & (self.partner >= 0)
        # The stream restarts for every shell; all groups together take the most draws.
        self.uniforms = cctbx_uniform_stream(max(cctbx_draws_needed(g),
                                                 cctbx_draws_needed(a)))
        self._complete = None
        self._shell_orders = {}  # id(grouping) -> the group order of every shell
        self._shell_halves = {}  # (id(grouping), weighted) -> {shell's position: halves}

    def set_shell_orders(self, groups, orders):
        """The group orders (overall, then each shell) whose half means _half_means will ask
        for: the first request of a grouping and weighting computes all of them in one
        kernel call, the orders spread over the threads (each order's halves restart the
        stream, so they are independent: the same values as one call per order)."""
        self._shell_orders[id(groups)] = [np.asarray(o, dtype=np.int64) for o in orders]

    def shell_halves(self, groups, order, weighted):
        """The half means of `order` if it is one of set_shell_orders's (each order's are
        handed out once, then dropped), else None."""
        orders = self._shell_orders.get(id(groups))
        if orders is None:
            return None
        key = (id(groups), bool(weighted))
        if key not in self._shell_halves:
            self._shell_halves[key] = _half_means_of_orders(self, groups, orders, weighted)
        pending = self._shell_halves[key]
        for j in list(pending):
            if np.array_equal(orders[j], order):
                return pending.pop(j)
        return None

    def complete_set_dstar_sq(self, d_min):
        """d*^2 of the complete set (this grouping's anomalous flag) down to d_min."""
        from cctbx import crystal, miller

        symmetry = crystal.symmetry(unit_cell=self.unit_cell, space_group=self.space_group)
        complete = miller.build_set(symmetry, self.anomalous, d_min=d_min * (1 - 1e-6))
        return (complete.d_spacings().data().as_numpy_array(),
                np.sqrt(complete.d_star_sq().data().as_numpy_array()))


def anomalous_signal_statistics(i_plus, i_minus, sigma_plus, sigma_minus,
                                probability_plot=False, expected_delta=0.9):
    """dF/F, dI/s(dI) and (optionally) the normal probability plot of Bijvoet pairs of merged
    intensities: dict of ShellStatistics fields (module docstring)."""
    out = {"anom_signal": 0.0 if len(i_plus) == 0 else None,
           "delta_i_mean_over_sig_delta_i_mean": None}
    if len(i_plus) == 0:
        return out
    positive = (i_plus > 0) & (i_minus > 0)
    if positive.any():
        f_plus, f_minus = np.sqrt(i_plus[positive]), np.sqrt(i_minus[positive])
        out["anom_signal"] = math.sqrt(2 * np.mean((f_plus - f_minus) ** 2)
                                       / np.mean(f_plus**2 + f_minus**2))
    else:
        out["anom_signal"] = 0.0
    delta = i_plus - i_minus
    sigma_delta = np.sqrt(sigma_plus**2 + sigma_minus**2)
    ok = sigma_delta > 0
    if ok.any():
        out["delta_i_mean_over_sig_delta_i_mean"] = float(
            np.mean(np.abs(delta[ok])) / np.mean(sigma_delta[ok]))
    if probability_plot:
        from scipy.special import ndtri  # = scipy.stats.norm.ppf, without scipy.stats

        y = np.sort(delta / sigma_delta)
        x = ndtri((np.arange(1, len(y) + 1) - 0.5) / len(y))
        for key, keep in (("", np.abs(x) < expected_delta), ("_all_data", np.ones(len(x), bool))):
            fit = _least_squares_line(x[keep], y[keep])
            if key == "":
                out["anom_probability_slope"] = fit[0]
                out["anom_probability_intercept"] = fit[1]
                out["anom_probability_n_pairs"] = int(keep.sum()) if fit[0] is not None else None
            else:
                out["anom_probability_slope_all_data"] = fit[0]
    return out


def _least_squares_line(x, y):
    """(slope, intercept) of y = a + b x, or (None, None) when x has no spread."""
    if len(x) < 2:
        return None, None
    dx = x - x.mean()
    sxx = float(np.dot(dx, dx))
    if not sxx > 0:
        return None, None
    slope = float(np.dot(dx, y - y.mean())) / sxx
    return slope, float(y.mean() - slope * x.mean())


def _shell_statistics(prep: _Prepared, group_sel, anom_sel, d_max_min, level, complete_dss,
                      anom_complete_dss, probability_plot=False, anomalous_memo=None):
    """anomalous_memo: (dict, key) to reuse this shell's CCanom and Ranom from the other
    table of the same observations (see _ANOMALOUS_DIFFERENCE_FIELDS), or None."""
    # One function per group of statistics, so each one's per-group temporaries are gone
    # before the next one's are made.
    stats = ShellStatistics(d_max=0.0, d_min=0.0)
    if not _intensity_statistics(stats, prep, group_sel, d_max_min, complete_dss):
        return stats
    _cc_half(stats, prep, group_sel, level)
    n_pairs = _memoised_anomalous_differences(stats, prep, anom_sel, level, anomalous_memo)
    if prep.anomalous and anom_complete_dss is not None:
        _anomalous_completeness(stats, prep, group_sel, n_pairs, anom_complete_dss)
    if prep.anomalous:
        _bijvoet_signal(stats, prep, group_sel, probability_plot)
    return stats


def _intensity_statistics(stats, prep, group_sel, d_max_min, complete_dss) -> bool:
    """Counts, completeness, <I>, <I/sigma>, Rmerge/Rmeas/Rpim; False if no group."""
    # The shell's groups as positions, found once: six boolean-mask selections over every
    # group of the table cost ~5x one flatnonzero and six takes (the same values in the
    # same order; ~1.5 ms a shell of a 1e6 sweep, 42 shells; issue 10).
    rows = np.flatnonzero(group_sel) if group_sel.dtype == bool else group_sel
    n = prep.n[rows]
    if len(n) == 0:
        return False
    data_d = prep.group_d[rows]
    data_d_max, data_d_min = float(data_d.max()), float(data_d.min())
    del data_d
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
    del keep
    stats.completeness = min(stats.n_uniq / n_expected, 1.0) if n_expected else 0.0
    stats.multiplicity = float(n.mean())
    mean = prep.mean[rows]
    msig = prep.merged_sigma[rows]
    stats.i_mean = float(mean.mean())
    stats.sigi_mean = float(msig.mean())
    positive = msig > 0
    stats.i_over_sigma_mean = float((mean[positive] / msig[positive]).mean()) if positive.any() else 0.0
    del mean, msig, positive
    if _device_sums(prep):  # compute.device=cuda: the shell's sums on the device
        from ..backends.cuda_statistics import rmerge_sums

        sum_merge, sum_meas, sum_pim, denominator = rmerge_sums(prep, group_sel)
    else:
        multi = n > 1
        denominator = float(prep.total[rows][multi].sum())
        abs_dev = prep.abs_dev[rows][multi]
        nm = n[multi].astype(np.float64)
        sum_merge = float(abs_dev.sum())
        sum_meas = float((np.sqrt(nm / (nm - 1)) * abs_dev).sum())
        sum_pim = float((np.sqrt(1.0 / (nm - 1)) * abs_dev).sum())
    if denominator == 0:
        stats.r_merge = stats.r_meas = stats.r_pim = 0.0
    else:
        stats.r_merge = sum_merge / denominator
        stats.r_meas = sum_meas / denominator
        stats.r_pim = sum_pim / denominator
    return True


def _cc_half(stats, prep, group_sel, level):
    """CC1/2 on this grouping, fresh random stream."""
    g = prep.groups
    order = np.flatnonzero(group_sel) if group_sel.dtype == bool else np.asarray(group_sel)
    if _device_sums(prep):  # compute.device=cuda: the same halves and sums on the device
        from ..backends.cuda_statistics import cc_half

        stats.cc_half, stats.cc_half_n_refl = cc_half(prep, order)
    else:
        h1, h2 = _half_means(prep, g, order.astype(np.int64), True)
        ok = ~np.isnan(h1)
        stats.cc_half = pearson(h1[ok], h2[ok])
        stats.cc_half_n_refl = int(ok.sum())
        del h1, h2, ok
    del order
    if level is not None:
        stats.cc_half_significance, stats.cc_half_critical_value = cc_significance(
            stats.cc_half, stats.cc_half_n_refl, level)


# CCanom and Ranom are computed on the anomalous grouping whatever the table's anomalous flag,
# from the same shell limits and the same restarted random stream: the table with I+ and I-
# together and the one with them apart (with_anomalous_table) have the same values per shell.
_ANOMALOUS_DIFFERENCE_FIELDS = ("cc_anom", "cc_anom_n_pairs", "cc_anom_significance",
                                "cc_anom_critical_value", "r_anom")


def _memoised_anomalous_differences(stats, prep, anom_sel, level, memo) -> int:
    """_anomalous_differences, or its fields and pair count from `memo` = (dict, key) when
    the other table of the same observations has computed this shell already."""
    if memo is None:
        return _anomalous_differences(stats, prep, anom_sel, level)
    store, key = memo
    if key not in store:
        n_pairs = _anomalous_differences(stats, prep, anom_sel, level)
        store[key] = ({name: getattr(stats, name) for name in _ANOMALOUS_DIFFERENCE_FIELDS},
                      n_pairs)
        return n_pairs
    fields, n_pairs = store[key]
    for name, value in fields.items():
        setattr(stats, name, value)
    return n_pairs


def _anomalous_differences(stats, prep, anom_sel, level) -> int:
    """CCanom and Ranom on the anomalous grouping; returns the number of Bijvoet pairs."""
    a = prep.anom
    anom_order = np.flatnonzero(anom_sel).astype(np.int64)
    if _device_sums(prep):  # compute.device=cuda: the same halves and sums on the device
        return _device_anomalous_differences(stats, prep, anom_order, level)
    a1, a2 = _half_means(prep, a, anom_order, False)
    split_1 = np.full(a.n_groups, np.nan)
    split_2 = np.full(a.n_groups, np.nan)
    split_1[anom_order] = a1
    split_2[anom_order] = a2
    del a1, a2
    plus = anom_order[prep.plus[anom_order]]
    minus = prep.partner[plus]
    in_shell = np.zeros(a.n_groups, bool)
    in_shell[anom_order] = True
    del anom_order
    pair_ok = in_shell[minus] if len(minus) else np.zeros(0, bool)
    del in_shell
    plus, minus = plus[pair_ok], minus[pair_ok]
    del pair_ok
    both = ~np.isnan(split_1[plus]) & ~np.isnan(split_1[minus])
    d1 = split_1[plus][both] - split_1[minus][both]
    d2 = split_2[plus][both] - split_2[minus][both]
    del split_1, split_2
    stats.cc_anom = pearson(d1, d2)
    stats.cc_anom_n_pairs = int(both.sum())
    del d1, d2, both
    if level is not None:
        stats.cc_anom_significance, stats.cc_anom_critical_value = cc_significance(
            stats.cc_anom, stats.cc_anom_n_pairs, level)
    return _r_anom(stats, prep, plus, minus)


def _device_sums(prep) -> bool:
    from ..backends.run_device import pass_device

    return (pass_device() == "cuda" and prep.merger is None
            and not getattr(prep, "distributed", False))


def _device_anomalous_differences(stats, prep, anom_order, level) -> int:
    """_anomalous_differences with CCanom's halves and sums on the device
    (backends.cuda_statistics)."""
    from ..backends.cuda_statistics import cc_anom

    plus = anom_order[prep.plus[anom_order]]
    minus = prep.partner[plus]
    in_shell = np.zeros(prep.anom.n_groups, bool)
    in_shell[anom_order] = True
    pair_ok = in_shell[minus] if len(minus) else np.zeros(0, bool)
    plus, minus = plus[pair_ok], minus[pair_ok]
    stats.cc_anom, stats.cc_anom_n_pairs = cc_anom(prep, anom_order, plus, minus)
    if level is not None:
        stats.cc_anom_significance, stats.cc_anom_critical_value = cc_significance(
            stats.cc_anom, stats.cc_anom_n_pairs, level)
    return _r_anom(stats, prep, plus, minus)


def _r_anom(stats, prep, plus, minus) -> int:
    """Ranom over the Bijvoet pairs (plus, minus); returns their number."""
    if len(plus):
        i_plus, i_minus = prep.anom_mean[plus], prep.anom_mean[minus]
        w_plus = 1.0 / prep.anom_sigma_internal[plus] ** 2
        w_minus = 1.0 / prep.anom_sigma_internal[minus] ** 2
        average = (w_plus * i_plus + w_minus * i_minus) / (w_plus + w_minus)
        denominator = float(np.abs(average).sum())
        stats.r_anom = float(np.abs(i_plus - i_minus).sum()) / denominator if denominator > 0 else None
    else:
        stats.r_anom = None
    return int(plus.size)


def _anomalous_completeness(stats, prep, group_sel, pairs, anom_complete_dss):
    """cctbx: Bijvoet pairs / acentrics of the non-anomalous complete set in the range."""
    acentric = ~prep.groups.centric[group_sel]
    d_acentric, d_star_acentric = anom_complete_dss
    keep = d_acentric >= stats.d_min * (1 - 1e-6)
    if stats.d_max > 0:
        keep &= d_star_acentric >= 1.0 / stats.d_max
    n_acentric_expected = int(keep.sum())
    stats.anom_completeness = min(pairs / n_acentric_expected, 1.0) if n_acentric_expected else 0
    stats.anom_multiplicity = (float(prep.n[group_sel][acentric].mean()) if acentric.any()
                               else None)


def _bijvoet_signal(stats, prep, group_sel, probability_plot):
    """Bijvoet pairs of this grouping (I+ and I- apart), both members in the selection."""
    g = prep.groups
    selected = np.zeros(g.n_groups, bool)
    selected[group_sel] = True
    plus_groups = np.flatnonzero(selected & prep.plus)
    minus_groups = prep.partner[plus_groups]
    both_in = selected[minus_groups]
    del selected
    plus_groups, minus_groups = plus_groups[both_in], minus_groups[both_in]
    for name, value in anomalous_signal_statistics(
            prep.mean[plus_groups], prep.mean[minus_groups],
            prep.merged_sigma[plus_groups], prep.merged_sigma[minus_groups],
            probability_plot).items():
        setattr(stats, name, value)


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
    suggest_cut: bool = True,
    groupings: Optional[Groupings] = None,
    merger=None,
    _anomalous_memo: Optional[dict] = None,
) -> MergingStatistics:
    """Statistics of unmerged scaled intensities (I/g, sigma/g), overall and by shell.

    with_anomalous_table: also the statistics with I+ and I- apart (anomalous_statistics).
    suggest_cut: where the CC1/2 fit suggests a limit inside the data, also the statistics of
    the data cut there (cut_statistics, with its own anomalous table).
    groupings: the Groupings of these observations (rows as given) when the caller has them
    already (merging does); computed here otherwise.
    merger: the statistics of another merging method's merged intensities (merging.api
    MethodMerger): merger.merge(groups, I, sigma) gives the merged I and sigma per group for
    <I>, <I/sigma>, Rmerge/Rmeas/Rpim, Ranom and the anomalous signal, and
    merger.half_means(groups, I, sigma) the method's merge of each CC1/2 and CCanom half
    (the same random halves). None: inverse-variance means, as iotbx (cctbx's values).
    _anomalous_memo: the per-shell CCanom and Ranom of the table with I+ and I- together,
    handed to its anomalous table (same observations, groupings, shells and stream)."""
    if _anomalous_memo is None:
        _anomalous_memo = {}
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    unit_cell = symmetry_compatible_cell(unit_cell, space_group)
    limits, d_ranges = equal_volume_limits(unit_cell, miller_index, n_bins)
    if groupings is None:
        groupings = Groupings(miller_index, space_group, unit_cell)
    positive = sigma > 0
    if positive.all():
        used = groupings
        used_intensity, used_sigma = intensity, sigma
    else:
        used = groupings.subset(positive)
        used_intensity, used_sigma = intensity[positive], sigma[positive]
    del positive
    prep = _Prepared(used_intensity, used_sigma, space_group, unit_cell, anomalous, used,
                     merger)
    del used_intensity, used_sigma
    g, a = prep.groups, prep.anom
    complete_dss = prep.complete_set_dstar_sq(float(prep.group_d.min()))
    anom_complete_dss = None
    if anomalous:
        complete_acentric = _acentric_complete(prep, float(prep.group_d.min()))
        anom_complete_dss = complete_acentric
    group_shell = shell_of(g.dstar_sq, limits)
    anom_shell = shell_of(a.dstar_sq, limits)
    # the CC1/2 and CCanom half-splits of the overall table and every shell in one call
    # per grouping, on all threads (each restarts the stream: independent)
    for grouping, shell in ((g, group_shell), (a, anom_shell)):
        prep.set_shell_orders(grouping, [np.arange(grouping.n_groups, dtype=np.int64)] + [
            np.flatnonzero(shell == b) for b in range(n_bins)])
    all_groups = np.ones(g.n_groups, bool)
    all_anom = np.ones(a.n_groups, bool)
    overall = _shell_statistics(prep, all_groups, all_anom, None, significance_level,
                                complete_dss, anom_complete_dss, probability_plot=True,
                                anomalous_memo=(_anomalous_memo, "overall"))
    shells = []
    for b in range(n_bins):
        d_range = d_ranges[b]
        sel = group_shell == b
        if not sel.any():
            shells.append(ShellStatistics(d_max=d_range[0], d_min=d_range[1]))
            continue
        shells.append(_shell_statistics(prep, sel, anom_shell == b, d_range, significance_level,
                                        complete_dss, anom_complete_dss,
                                        anomalous_memo=(_anomalous_memo, b)))
    del prep, g, a, used
    weights = np.array([s.cc_half_n_refl for s in shells], dtype=np.float64)
    values = np.array([s.cc_half for s in shells])
    cc_half_overall = float((weights * values).sum() / weights.sum()) if weights.sum() else 0.0
    result = MergingStatistics(
        overall=overall, shells=shells, anomalous=anomalous, n_bins=n_bins,
        cc_half_overall=cc_half_overall,
    )
    result.method = "classical" if merger is None else merger.method
    result.d_min_cc_half_fit = cc_half_resolution_estimate(result)
    if with_anomalous_table and not anomalous:
        result.anomalous_statistics = merging_statistics(
            miller_index, intensity, sigma, space_group, unit_cell, n_bins, True,
            significance_level, False, suggest_cut=False, groupings=groupings, merger=merger,
            _anomalous_memo=_anomalous_memo)
    d_fit = result.d_min_cc_half_fit
    if suggest_cut and d_fit is not None and d_fit - shells[-1].d_min > CUT_TOLERANCE_A:
        # cctbx resolution_filter(d_min): keep 1/d <= 1/d_min
        keep = np.sqrt(per_index_chunks(miller_index, unit_cell.d_star_sq)) <= 1.0 / d_fit
        result.cut_statistics = merging_statistics(
            miller_index[keep], intensity[keep], sigma[keep], space_group, unit_cell, n_bins,
            anomalous, significance_level, with_anomalous_table, suggest_cut=False,
            groupings=groupings.subset(keep), merger=merger)
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
    from .groups import flex_indices

    if len(asu_index) == 0:
        return np.zeros(0)
    return unit_cell.d(flex_indices(asu_index)).as_numpy_array()


# -- resolution estimate -----------------------------------------------------------------------
CC_HALF_FIT_IQR_MULTIPLIER = 6  # dials.util.resolution_analysis passes 6 to its tanh fit


def cc_half_resolution_estimate(stats: MergingStatistics, limit: float = 0.3):
    """d where the tanh fit of CC1/2 against d*^2 falls to `limit`, as dials' resolution_cc_half
    (module docstring); None when no shell qualifies."""
    shells = stats.shells[::-1]  # from high resolution down, as dials scans
    dstar_sq = np.array([1.0 / s.d_min**2 if s.d_min > 0 else 0.0 for s in shells])
    cc = np.array([s.cc_half for s in shells])
    use = np.array([bool(s.cc_half_significance) for s in shells]) & (cc > 0)
    dstar_sq, cc = dstar_sq[use], cc[use]
    if len(cc) == 0:
        return None
    if cc.min() > limit:
        return float(1.0 / math.sqrt(dstar_sq.max()))
    try:
        fitted = _tanh_fit(dstar_sq, cc)
        crossing = _first_crossing(dstar_sq, fitted, limit)
        return float(1.0 / math.sqrt(crossing))
    except Exception:  # no crossing or a failed fit: the data's limit, as dials
        return float(1.0 / math.sqrt(dstar_sq.max()))


def _tanh_fit(x, y):
    """Fitted values of (1 - tanh((x - s0)/r))/2 (scitbx curve_fitting, LBFGS from r = s0 = 1),
    refitted without points more than 6 interquartile ranges from the quartiles."""
    from cctbx.array_family import flex
    from scitbx.math import curve_fitting, five_number_summary

    x_flex, y_flex = flex.double(x), flex.double(y)
    function = curve_fitting.tanh(*curve_fitting.tanh_fit(x_flex, y_flex).params)
    residual = y_flex - function(x_flex)
    _, q1, _, q3, _ = five_number_summary(residual)
    cut = CC_HALF_FIT_IQR_MULTIPLIER * (q3 - q1)
    outliers = (residual > q3 + cut) | (residual < q1 - cut)
    if outliers.count(True) > 0:
        keep = ~outliers
        function = curve_fitting.tanh(
            *curve_fitting.tanh_fit(x_flex.select(keep), y_flex.select(keep)).params)
    return function(x_flex).as_numpy_array()


def _first_crossing(x, y, level):
    """x where the piecewise-linear y(x) first crosses `level` (points in the given order)."""
    if level > y.max() or level < y.min():
        raise ValueError("level outside the fitted values")
    for j in range(1, len(x)):  # a loop over <= n_bins shells
        if (y[j - 1] - level) * (y[j] - level) < 0:
            return x[j - 1] + (level - y[j - 1]) * (x[j] - x[j - 1]) / (y[j] - y[j - 1])
    raise ValueError("no crossing")
