"""The basic error model sigma'^2 = a^2 (sigma^2 + (b I)^2) (dials-scaling.md 6).

Refinement data: a fresh anomalous Ih table of suitable, non-outlier reflections weighted by
1/sigma^2 with the current g, then filtered (group mean I/sigma^2 > 0.85, Ih g > min_Ih,
I > 0.001 and n_h > 1 with at least 250 reflections, groups with a huge internal/external
variance ratio dropped). Normalised deviations

    delta = sqrt((n_h - 1)/n_h) (I/g - Ih) / sigma',   sigma' = a sqrt(sigma^2 + (b I)^2) / g

are binned by expected intensity Ih g (log-spaced bins, minimum counts). `individual`
minimisation alternates an a-step (slope of the central normal probability plot) and a
b-step (bin variances towards 1 by the DIALS functional) until |da/a| < 0.01; on failure it
resets to (1, 0.02) and refines b alone. `regression` fits y = a^2 x + a^2 b^2.

The prefactor sqrt((n_h - 1)/n_h) above is dials.scale's (deviation="dials"). Because Ih
includes the observation, I/g - Ih has variance (n_h - 1)/n_h sigma'^2 for correct sigmas, so
that prefactor fits a = (n_h - 1)/n_h, not 1, and merged sigmas come out too small. The default
here, deviation="unbiased", uses sqrt(n_h/(n_h - 1)), whose deviations have unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
# ndtri/ndtr are what scipy.stats.norm.ppf/cdf evaluate; importing scipy.stats and
# scipy.optimize (~45 MB of RSS) for them and one 1-D minimisation (b_step) is not worth it.
from scipy.special import ndtr, ndtri

from ..kernels.error_model_ml import binned_deviation_sums as _binned_deviation_sums  # noqa: E501
from .ih_table import build_ih_table
from ..memory import release_free_memory

DEFAULT_A = 1.0
DEFAULT_B = 0.02
MIN_REFLECTIONS = 250
MAX_CYCLES = 50
A_CONVERGENCE = 0.01
MIN_CONVERGED_A = 0.4
PROBABILITY_PLOT_CUTOFF = 1.5


class ErrorModelError(Exception):
    """Refinement impossible on these data; the caller keeps the current model."""


@dataclass
class BasicErrorModel:
    a: float = DEFAULT_A
    b: float = DEFAULT_B

    def variance(self, intensity, variance):
        return self.a * self.a * (variance + (self.b * intensity) ** 2)

    def weights(self, intensity, variance):
        with np.errstate(divide="ignore"):
            return 1.0 / self.variance(intensity, variance)

    @property
    def parameters(self):
        return [float(self.a), float(self.b)]


def error_model_weights(intensity, variance, model):
    """Minimisation weights 1/sigma'^2, or 1/sigma^2 without an error model."""
    with np.errstate(divide="ignore"):
        if model is None:
            return 1.0 / variance
        return model.weights(intensity, variance)


@dataclass
class ErrorModelData:
    intensity: np.ndarray
    variance: np.ndarray
    g: np.ndarray
    ih: np.ndarray  # per observation
    n_h: np.ndarray  # per observation
    expected: np.ndarray  # Ih g (x partiality)
    bin_index: np.ndarray  # -1 where the bin was deleted
    n_bins: int
    prefactor: np.ndarray = None  # per observation, multiplies (I/g - Ih)/sigma'
    weight_share: np.ndarray = None  # per observation, w g^2 / sum over its group (in Ih)
    group: np.ndarray = None  # per observation, its group


def friedel_pair_layout(anomalous_asu, non_anomalous_asu, rows=None, full_sizes=None):
    """The anomalous group sort of rows `rows` (per dataset; None: all) of the per-dataset
    index arrays, as an ih_table.GroupLayout (the layout GroupLayout(anomalous_asu[rows],
    loc_indices=rows, full_sizes=full_sizes) would be), with its groups ordered by
    (non-anomalous ASU index, hand): I(+) then I(-) of one unique reflection, unique
    reflections in (h, k, l) order. Within a group the observations keep the
    dataset-then-row order.

    Why not GroupLayout's (h, k, l) order of the anomalous indices: there the I(-) groups of
    one range of unique reflections lie among the I(+) groups of another, so the groups of an
    MPI rank's key range (issue 11, backends/rank_partition.py) were not one contiguous run
    of the one-process order. In this order they are, and sums over the error model's
    observations continued from rank to rank (rank_local.sequential_over_ranks) have the
    bits of one process. Every run, one process included, uses this order (its sums over
    observations moved a, b in their last bits once: README, issue 11).

    hand: 1 where the anomalous index differs from the non-anomalous one (the Friedel mate
    of the unique reflection's representative), 0 where it is the representative; a unique
    reflection has at most these two anomalous groups. The keys are packed per dataset from
    the rows themselves (no joined or masked copy of the indices).
    """
    from ..kernels.error_model_ml import friedel_pair_keys, index_bounds
    from ..kernels.group_sort import grouped_counting_sort
    from .ih_table import COUNTING_SORT_MIN_SPAN, COUNTING_SORT_SPAN_PER_ROW, GroupLayout

    anomalous_asu = [np.ascontiguousarray(a, dtype=np.int32).reshape(-1, 3)
                     for a in anomalous_asu]
    non_anomalous_asu = [np.ascontiguousarray(a, dtype=np.int32).reshape(-1, 3)
                         for a in non_anomalous_asu]
    if rows is None:
        rows = [np.arange(a.shape[0], dtype=np.int64) for a in anomalous_asu]
    rows = [np.asarray(r, dtype=np.int64) for r in rows]
    for a, m, r in zip(anomalous_asu, non_anomalous_asu, rows):
        if a.shape != m.shape or (r.size and int(r.max()) >= a.shape[0]):
            raise ValueError("friedel_pair_layout: index arrays and rows do not match")
    n_per = [r.size for r in rows]
    n = int(sum(n_per))
    lo = np.full(3, np.iinfo(np.int64).max, np.int64)
    hi = np.full(3, np.iinfo(np.int64).min, np.int64)
    for m, r in zip(non_anomalous_asu, rows):
        index_bounds(m, r, lo, hi)
    keys = np.empty(n, np.int64)
    if n:
        span1, span2 = int(hi[1] - lo[1] + 1), int(hi[2] - lo[2] + 1)
        start = 0
        for a, m, r in zip(anomalous_asu, non_anomalous_asu, rows):
            friedel_pair_keys(a, m, r, lo, span1, span2, keys, start)
            start += r.size
        span = int(keys.max()) + 1
        if span <= max(COUNTING_SORT_SPAN_PER_ROW * n, COUNTING_SORT_MIN_SPAN):
            order, group_start = grouped_counting_sort(keys, span)
        else:
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            boundaries = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
            group_start = np.concatenate([[0], boundaries, [n]]).astype(np.int64)
            del sorted_keys
    else:
        order, group_start = np.zeros(0, np.int64), np.zeros(1, np.int64)
    del keys
    layout = GroupLayout.__new__(GroupLayout)
    layout.offsets = np.concatenate([[0], np.cumsum(n_per)]).astype(np.int64)
    layout.order = np.asarray(order, dtype=np.int64)
    layout.group_start = np.asarray(group_start, dtype=np.int64)
    layout.dataset_id = np.repeat(np.arange(len(n_per), dtype=np.int32), n_per)[layout.order]
    joined_rows = rows[0] if len(rows) == 1 else (np.concatenate(rows) if rows
                                                   else np.zeros(0, np.int64))
    layout.loc_index = np.ascontiguousarray(joined_rows[layout.order])
    del joined_rows
    first = layout.group_start[:-1]
    group_asu = np.empty((first.size, 3), np.int32)
    first_dataset = layout.dataset_id[first]
    for d, a in enumerate(anomalous_asu):
        mine = np.flatnonzero(first_dataset == d)
        group_asu[mine] = a[layout.loc_index[first[mine]]]
    layout.group_asu = group_asu
    sizes = full_sizes if full_sizes is not None else [a.shape[0] for a in anomalous_asu]
    layout.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    layout.order = layout.offsets[layout.dataset_id] + layout.loc_index
    return layout


def rank_local_supported(minimisation="auto", deviation="unbiased", target="least_squares"):
    """Whether refine_error_model gives one process's a, b in a rank-local MPI job (issue
    11), and how: the maximum-likelihood fit (the default: minimisation=auto with
    deviation=unbiased) sums over each rank's own observations (a few floats exchanged per
    evaluation of b); `individual` and `regression` filter on the ranks' own rows and then
    gather the filtered table to every rank (~50 B per kept observation on each rank: not
    1/N memory for that step) and fit it as one process. Not the likelihood target's own
    fit (scaling/likelihood.py)."""
    return target != "likelihood"


def gathered_table(table):
    """In a rank-local job: every rank's filtered error-model table concatenated in rank
    order, on every rank. The ranks' groups are consecutive runs of the one-process group
    order (friedel_pair_layout), so this is the one-process table, bit for bit. Elsewhere:
    the table itself."""
    from ..backends import rank_local
    from .ih_table import IhTable

    if not rank_local.active():
        return table
    sizes = rank_local.gather_in_rank_order(np.diff(table.group_start).astype(np.int64))
    group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def rows(values, dtype):
        return rank_local.gather_in_rank_order(np.ascontiguousarray(values, dtype=dtype))

    weight = table.weight if table.weight is not None else 1.0 / table.variance
    return IhTable(rows(table.intensity, np.float64), rows(table.variance, np.float64),
                   rows(weight, np.float64), rows(table.g, np.float64),
                   rows(table.dataset_id, np.int32), rows(table.loc_index, np.int64),
                   group_start,
                   rows(np.asarray(table.asu_index).reshape(-1, 3), np.int32),
                   {name: rows(values, np.float64) for name, values in
                    sorted(table.extra.items())})


def _too_few(n_obs):
    """ErrorModelError when fewer than MIN_REFLECTIONS observations are left (counted over
    the ranks of a rank-local job: the same decision on every rank)."""
    from ..backends import rank_local

    total = rank_local.total(n_obs)
    if total < MIN_REFLECTIONS:
        raise ErrorModelError(
            f"too few reflections for error model refinement ({total} < {MIN_REFLECTIONS})")


def unfiltered_table(asu_indices, intensities, variances, gs, partialities=None, layout=None):
    """The anomalous Ih table of the reflections, before the error model's filters: weights
    1 / variance, partialities carried along (see filter_for_error_model)."""
    extra = {"partiality": partialities} if partialities is not None else None
    weights = [1.0 / np.asarray(v, dtype=float) for v in variances]
    if layout is not None:
        return layout.table(intensities, variances, weights, gs, extra=extra)
    return build_ih_table(asu_indices, intensities, variances, weights, gs, extra=extra)


def filter_for_error_model(asu_indices, intensities, variances, gs, partialities=None,
                           min_partiality=None, min_ih=25.0, layout=None, stills=None, model=None,
                           deviation="unbiased", ih_table=None):
    """The filtered anomalous Ih table the error model is refined on (an IhTable).

    layout: optional ih_table.GroupLayout of the reflections to use (anomalous ASU groups);
    the per-dataset arrays are then the full arrays the layout indexes, asu_indices unused.
    ih_table: optional, the unfiltered table itself (as `unfiltered_table` builds it); the
    per-dataset arrays and layout are then unused, and the filters consume its columns.
    """
    if ih_table is not None:
        table = ih_table
    else:
        table = unfiltered_table(asu_indices, intensities, variances, gs, partialities, layout)
    del ih_table, layout
    # the layout's sort and gathers left holes in the heaps: their pages go back before the
    # filters' selections allocate (memory.py; a few ms)
    release_free_memory(collect_cycles=False)
    # Each filter below replaces the table by its selection, consuming the old one: the
    # chain then never holds two tables of all reflections at once.
    if min_partiality is not None and "partiality" in table.extra:
        keep = table.extra["partiality"] > min_partiality
        if not keep.all():  # callers with a layout have usually cut already: skip the copy
            table = table.select(keep, consume=True)
    if stills is not None:
        return _filter_stills(table, stills, min_ih, model or BasicErrorModel(), deviation)
    # The first filter reads no weights: they (1 / variance, as unfiltered_table sets them)
    # are formed for the rows it keeps, not selected from all rows (one array of all rows
    # fewer at this step's peak; the same values).
    table.weight = None
    # Each table's group of every observation is formed once, as int32, and handed to its
    # select (which would otherwise form its own int64 copy beside the caller's): at this
    # step's peak, the first select of all reflections, 1.5 arrays of 8 B/row fewer (issue
    # 10, memory). The same groups, so the same selections.
    grp = _group_of_observation(table)
    n_h = table.multiplicity()
    i_over_var = np.bincount(grp, table.intensity / table.variance, minlength=table.n_groups)
    keep_group = i_over_var / np.maximum(n_h, 1) > 0.85
    del n_h, i_over_var
    table = table.select(keep_group[grp], consume=True, group_of_obs=grp)
    del grp, keep_group
    table.weight = 1.0 / table.variance
    ih = table.merged_intensity()
    grp = _group_of_observation(table)
    keep = ih[grp] * table.g > min_ih
    del ih
    table = table.select(keep, consume=True, group_of_obs=grp)
    del grp, keep
    table = table.select(table.intensity > 0.001, consume=True)
    _too_few(table.n_obs)
    grp = _group_of_observation(table)
    keep = (table.multiplicity() > 1)[grp]
    table = table.select(keep, consume=True, group_of_obs=grp)
    del grp, keep
    # internal over external variance ratio per group
    grp = table.group_of_observation()
    n_h = table.multiplicity().astype(float)
    ih = table.merged_intensity()
    scaled = table.intensity / table.g
    internal = np.bincount(grp, (scaled - ih[grp]) ** 2, minlength=table.n_groups) / np.maximum(
        n_h - 1, 1)
    del scaled
    external = np.bincount(grp, table.variance / table.g ** 2, minlength=table.n_groups) / n_h
    # the largest Ih over all ranks of a rank-local job (-inf where a rank has none)
    from ..backends import rank_local

    largest = rank_local.maximum(float(ih.max()) if ih.size else -np.inf)
    limit = max(50.0, largest / 40.0) if np.isfinite(largest) else 50.0
    table = table.select((internal / external < limit)[grp], consume=True)
    _too_few(table.n_obs)
    return table


def _group_of_observation(table):
    """table.group_of_observation() as int32 (half the memory; group counts of one table
    are far below 2**31)."""
    return np.repeat(np.arange(table.n_groups, dtype=np.int32), np.diff(table.group_start))


def _filter_stills(table, stills, min_ih, model, deviation="unbiased"):
    """The stills filter of dials.scale (error_model.stills): I/sigma >= min_Isigma,
    Ih g p > min_Ih, |delta| < 6 under the current model, multiplicity >= min_multiplicity."""
    min_isigma, min_multiplicity = stills
    table = table.select(table.intensity / np.sqrt(table.variance) >= min_isigma, consume=True)
    grp = table.group_of_observation()
    expected = table.merged_intensity()[grp] * table.g
    if "partiality" in table.extra:
        expected = expected * table.extra["partiality"]
    table = table.select(expected > min_ih, consume=True)
    grp = table.group_of_observation()
    n_h = table.multiplicity()[grp].astype(float)
    ih = table.merged_intensity()[grp]
    sigma_prime = model.a * np.sqrt(table.variance + (model.b * table.intensity) ** 2) / table.g
    with np.errstate(divide="ignore", invalid="ignore"):  # n_h = 1: dropped below
        delta = DEVIATION_PREFACTORS[deviation](n_h) * (table.intensity / table.g - ih) / sigma_prime
    table = table.select(np.abs(delta) < 6.0, consume=True)
    table = table.select((table.multiplicity() >= min_multiplicity)[table.group_of_observation()],
                         consume=True)
    _too_few(table.n_obs)
    return table


DEVIATION_PREFACTORS = {
    # dials.scale: sqrt((n-1)/n). For correct sigmas the deviation of one of n equally
    # weighted observations from their mean has variance (n-1)/n, so this makes var(delta) =
    # ((n-1)/n)^2 and fits a < 1 (a = 0.67 for n = 3 on data simulated with a = 1).
    "dials": lambda n_h: np.sqrt((n_h - 1.0) / n_h),
    # var(delta) = 1 for correct sigmas: a = 1 is recovered (equal weights; see
    # unbiased_prefactor for the weighted form error_model_data uses).
    "unbiased": lambda n_h: np.sqrt(n_h / (n_h - 1.0)),
}


def unbiased_prefactor(table):
    """Per observation 1/sqrt(1 - u_i/U): u = w g^2 is the weight of I/g in Ih and U its group
    sum, so (I/g - Ih) has variance sigma'^2/g^2 (1 - u_i/U) when the weights are 1/sigma'^2.

    Equal weights give sqrt(n/(n-1)). Unequal weights (partials, several g in a group) make
    sqrt(n/(n-1)) right only on average over a group: the deviations are then a mixture of
    normals of different widths, whose normal-probability-plot slope (the a-step) is below 1
    (a fitted 3.7% low at a = 1 and 1.5 on the rotation simulations of
    tests/test_error_model_calibration.py); this form makes each deviation unit normal.
    The error model's a cancels in u_i/U; b does not, so with b > 0 it is approximate.
    """
    grp = table.group_of_observation()
    u = table.weight * table.g * table.g
    total = np.bincount(grp, u, minlength=table.n_groups)[grp]
    with np.errstate(divide="ignore", invalid="ignore"):
        remaining = 1.0 - u / total
    return 1.0 / np.sqrt(np.clip(remaining, 1e-12, None))


def error_model_data(table, n_bins=10, deviation="unbiased", bins=True):
    """bins: False for the maximum-likelihood fit, which reads no intensity bins (their
    edges are order statistics over all observations: not rank-local, issue 11)."""
    grp = table.group_of_observation()
    ih = table.merged_intensity()[grp]
    n_h = table.multiplicity()[grp].astype(float)
    expected = ih * table.g
    if "partiality" in table.extra:
        expected = expected * table.extra["partiality"]
    bin_index, kept = intensity_bins(expected, n_bins) if bins else (None, 0)
    prefactor = unbiased_prefactor(table) if deviation == "unbiased" else \
        DEVIATION_PREFACTORS[deviation](n_h)
    u = table.weight * table.g * table.g
    share = u / np.bincount(grp, u, minlength=table.n_groups)[grp]
    return ErrorModelData(table.intensity, table.variance, table.g, ih, n_h, expected,
                          bin_index, kept, prefactor, share, grp)


def intensity_bins(expected, n_bins=10):
    """Bin index per reflection over log-spaced expected-intensity bins, with bin edges
    lowered until each bin holds min(T, N/30) reflections; sparse bins deleted (-1)."""
    n = expected.size
    per_bin_target = 250 if n <= 25000 else n // 100
    min_per_bin = min(per_bin_target, int(n / (3.0 * n_bins)))
    negated = -expected  # the m-th largest expected below: a partition, not a full sort
    i_max = float(expected.max())
    i_min = max(1.0, float(expected.min()))
    spacing = (np.log(i_max) - np.log(i_min)) / n_bins
    bounds = [i_max] + [float(np.exp(np.log(i_max) - i * spacing)) for i in range(1, n_bins + 1)]
    bounds[-1] = float(expected.min()) - 0.01
    bin_index = np.full(n, -1, dtype=np.int64)
    counts = []
    n_cumulative = 0
    for i in range(n_bins):
        upper, lower = bounds[i], bounds[i + 1]
        in_bin = (expected <= upper) & (expected > lower)
        count = int(in_bin.sum())
        if count < min_per_bin:
            m = n_cumulative + min_per_bin
            if m < n:
                bounds[i + 1] = -float(np.partition(negated, m)[m])
                in_bin = (expected <= upper) & (expected > bounds[i + 1])
                count = int(in_bin.sum())
        bin_index[in_bin] = i
        counts.append(count)
        n_cumulative += count
    deleted = [i for i, c in enumerate(counts) if c < min_per_bin - 5]
    remap = np.full(n_bins, -1, dtype=np.int64)
    kept = [i for i in range(n_bins) if i not in deleted]
    remap[kept] = np.arange(len(kept))
    valid = bin_index >= 0
    bin_index[valid] = remap[bin_index[valid]]
    return bin_index, len(kept)


def normalised_deviations(data, a, b):
    sigma_prime = a * np.sqrt(data.variance + (b * data.intensity) ** 2) / data.g
    prefactor = data.prefactor if data.prefactor is not None else np.sqrt((data.n_h - 1.0) / data.n_h)
    return prefactor * (data.intensity / data.g - data.ih) / sigma_prime


def bin_variances(data, delta):
    valid = data.bin_index >= 0
    idx = data.bin_index[valid]
    d = delta[valid]
    count = np.bincount(idx, minlength=data.n_bins).astype(float)
    mean = np.bincount(idx, d, minlength=data.n_bins) / count
    mean_sq = np.bincount(idx, d * d, minlength=data.n_bins) / count
    weight = np.bincount(idx, data.expected[valid], minlength=data.n_bins) / count
    return mean_sq - mean * mean, weight


def _bin_counts_and_weights(data):
    """Per bin count and mean expected intensity (independent of a and b), cached."""
    cached = getattr(data, "_bin_counts_and_weights", None)
    if cached is None:
        valid = data.bin_index >= 0
        idx = data.bin_index[valid]
        count = np.bincount(idx, minlength=data.n_bins).astype(float)
        weight = np.bincount(idx, data.expected[valid], minlength=data.n_bins) / count
        cached = (count, weight)
        data._bin_counts_and_weights = cached
    return cached


def _on_device():
    """The error-model sums run on the scaling job's device (backends.run_device)."""
    from ..backends.run_device import pass_device

    return pass_device() == "cuda"


def _split_invariant_job():
    """True inside a program's scaling job (its read-time key partition is active): there
    the likelihood's sums are the host's one pass (continued rank to rank under MPI), so
    compute.device=cuda gives the same a and b for any number of MPI ranks. The device
    twin's per-CUDA-block partials depend on the rows a device holds (issue 11)."""
    from ..backends.rank_partition import active_partition

    return active_partition() is not None


def _device_binned_sums(data, prefactor):
    """The device twin of _binned_deviation_sums for this data (its arrays copied once)."""
    device = getattr(data, "_device_binned_sums", None)
    if device is None:
        from ..kernels.cuda.error_model import DeviceErrorModelSums

        from ..backends.cuda_job_table import error_model_upload

        device = DeviceErrorModelSums(data.intensity, data.variance, data.g, ih=data.ih,
                                      prefactor=prefactor, bin_index=data.bin_index,
                                      n_bins=data.n_bins, upload=error_model_upload())
        data._device_binned_sums = device
    return device


def b_functional(data, a, b):
    count, w = _bin_counts_and_weights(data)
    prefactor = data.prefactor if data.prefactor is not None else np.sqrt((data.n_h - 1.0) / data.n_h)
    if _on_device():
        s1, s2 = _device_binned_sums(data, prefactor).binned_deviation_sums(float(a), float(b))
    else:
        s1, s2 = _binned_deviation_sums(data.intensity, data.variance, data.g, data.ih,
                                        prefactor, data.bin_index, data.n_bins, float(a),
                                        float(b))
    mean = s1 / count
    v = s2 / count - mean * mean
    return float(np.sum(w * ((0.5 - v) ** 2 + 1.0 / v - 1.25)) / np.sum(w))


_QUANTILE_CACHE = {}


def _normal_quantiles(n, lo, hi):
    """Expected normal order statistics ppf((k + 0.5)/n), k in [lo, hi); one size at a time
    is kept (a refinement calls a_step repeatedly on the same reflections)."""
    key = (n, lo, hi)
    if key not in _QUANTILE_CACHE:
        _QUANTILE_CACHE.clear()
        _QUANTILE_CACHE[key] = ndtri((np.arange(lo, hi) + 0.5) / n)
    return _QUANTILE_CACHE[key]


def a_step(data, a, b):
    """a scaled by the slope of the central part of the normal probability plot."""
    delta = np.sort(normalised_deviations(data, a, b))
    n = delta.size
    lo = int(np.ceil(ndtr(-PROBABILITY_PLOT_CUTOFF) * n - 0.5))
    hi = int(np.ceil(ndtr(PROBABILITY_PLOT_CUTOFF) * n - 0.5))
    x = _normal_quantiles(n, lo, hi)
    y = delta[lo:hi]
    slope = np.polyfit(x, y, 1)[0]
    return a * float(slope)


B_FIRST_STEP = 1e-3  # smallest bracketing step; b of interest is ~0.005-0.2
B_MAX = 10.0  # sigma' = 10 I: no error model goes there; stops a runaway bracket
B_XATOL = 1e-9  # absolute accuracy of b (b = 0 is a common answer, so not relative alone)
B_MAX_EVALUATIONS = 200
_GOLDEN = 0.5 * (3.0 - 5.0 ** 0.5)  # 0.382: golden-section fraction of an interval
_SQRT_EPS = np.finfo(float).eps ** 0.5  # best relative accuracy of a minimum's position


def b_step(data, a, b):
    """b minimising b_functional at fixed a: the minimum reached downhill from |b|.

    The functional depends on b only through b^2, so the search is over b >= 0 (b = 0 is a
    stationary point, and the minimum when the data show no extra relative error).
    """
    def f(x):
        value = b_functional(data, a, x)
        return value if np.isfinite(value) else np.inf

    lo, x, fx, hi = _bracket_minimum(f, abs(float(b)))
    return abs(float(_brent_minimise(f, lo, hi, x, fx)))


def _bracket_minimum(f, x0):
    """(lo, x, f(x), hi), 0 <= lo <= x < hi, f(x) <= f at lo and hi (lo = 0 excepted: the
    minimum may sit on it): steps from x0 doubling downhill."""
    f0 = f(x0)
    step = max(0.5 * x0, B_FIRST_STEP)
    x1 = x0 + step
    f1 = f(x1)
    if f1 < f0:  # downhill upwards: go on until f rises
        lo = x0
        while x1 < B_MAX:
            step *= 2.0
            x2 = x1 + step
            f2 = f(x2)
            if f2 >= f1:
                return lo, x1, f1, x2
            lo, x1, f1 = x1, x2, f2
        return lo, x1, f1, x1 + step
    hi = x1
    while x0 > 0.0:
        x_down = max(0.0, x0 - step)
        f_down = f(x_down)
        if f_down >= f0:
            return x_down, x0, f0, hi
        hi, x0, f0 = x0, x_down, f_down
        step *= 2.0
    return 0.0, 0.0, f0, hi


def _brent_minimise(f, lo, hi, x, fx):
    """Brent's minimisation (parabolic steps, golden sections when they misbehave) of f on
    [lo, hi] from the point x inside it; the position to B_XATOL + sqrt(eps)|x|."""
    w = v = x
    fw = fv = fx
    step = previous_step = 0.0
    for _ in range(B_MAX_EVALUATIONS):
        mid = 0.5 * (lo + hi)
        tol = _SQRT_EPS * abs(x) + B_XATOL / 3.0
        if abs(x - mid) <= 2.0 * tol - 0.5 * (hi - lo):
            break
        parabolic = False
        if abs(previous_step) > tol:
            # vertex of the parabola through (x, fx), (w, fw), (v, fv), as x + p/q
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            # accepted when inside the interval and shorter than half the step before last
            # (otherwise the parabola is not converging and a golden section is safer)
            if abs(p) < abs(0.5 * q * previous_step) and q * (lo - x) < p < q * (hi - x):
                previous_step, step = step, p / q
                u = x + step
                if u - lo < 2.0 * tol or hi - u < 2.0 * tol:
                    step = tol if x < mid else -tol
                parabolic = True
        if not parabolic:
            previous_step = (hi - x) if x < mid else (lo - x)
            step = _GOLDEN * previous_step
        u = x + (step if abs(step) >= tol else np.copysign(tol, step))
        fu = f(u)
        if fu <= fx:
            if u < x:
                hi = x
            else:
                lo = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                lo = u
            else:
                hi = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
    return x


def refine_individual(data, a=DEFAULT_A, b=DEFAULT_B, fix_a=False, fix_b=False):
    """(a, b, log lines). Alternates a- and b-steps as DIALS's ErrorModelRefinery does."""
    log = []
    converged = False
    for _ in range(MAX_CYCLES):
        previous_a = a
        if not fix_a:
            a = a_step(data, a, b)
        if not fix_b:
            b = b_step(data, a, b)
        if fix_a or abs(a - previous_a) / abs(previous_a) < A_CONVERGENCE:
            converged = True
            break
    if converged and a > MIN_CONVERGED_A:
        if not fix_a:
            a = a_step(data, a, b)
        return abs(a), abs(b), log
    log.append("Two-parameter Error model refinement failed; refining b only")
    a = DEFAULT_A
    b = DEFAULT_B if not fix_b else b
    if not fix_b:
        b = b_step(data, a, b)
    return a, abs(b), log


def refine_maximum_likelihood(data, fixed_a=None, fixed_b=None):
    """(a, b) maximising the Gaussian likelihood of the deviations r_i = I_i/g_i - Ih.

    With x_j = I_j/g_j of variance v_j = a^2 q_j, q_j = (sigma_j^2 + b^2 I_j^2)/g_j^2, and
    Ih = sum_j p_j x_j (p the weight shares of the Ih table, whose weights ignore b):

        var(r_i) = a^2 [q_i (1 - 2 p_i) + sum_j p_j^2 q_j],

    exact whatever the weights (the unbiased prefactor is its b = 0 case). At fixed b the best
    a^2 is the mean of r^2 / (that variance at a = 1), in closed form; b minimises the profile
    -log L (the bracket + Brent search of b_step). Every observation counts, not only the
    centre of a probability plot or the bin variances of the DIALS functional.
    """
    intensity, variance, g, share = data.intensity, data.variance, data.g, data.weight_share
    residual_sq = (intensity / g - data.ih) ** 2
    n_groups = int(data.group.max()) + 1 if data.group.size else 0
    # one numba kernel per evaluation of b (kernels/error_model_ml.py), no numpy temporaries
    from ..kernels.error_model_ml import a_sq_and_cost_kernel

    arrays = [np.ascontiguousarray(v, dtype=np.float64)
              for v in (intensity, variance, g, share, residual_sq)]
    group = np.ascontiguousarray(data.group, dtype=np.int64)
    scratch = np.empty(group.size)
    fixed_a_sq = -1.0 if fixed_a is None else float(fixed_a) ** 2

    def a_sq_and_cost(b):
        a_sq, cost = a_sq_and_cost_kernel(arrays[0], arrays[1], arrays[2], arrays[3], group,
                                          arrays[4], n_groups, float(b), fixed_a_sq, scratch)
        return float(a_sq), float(cost)

    def cost_slope(b):
        from ..kernels.error_model_ml import cost_slope_kernel

        return float(cost_slope_kernel(arrays[0], arrays[1], arrays[2], arrays[3], group,
                                       arrays[4], n_groups, float(b), fixed_a_sq, scratch,
                                       np.empty(group.size)))

    from ..backends import rank_local

    if rank_local.active():
        a_sq_and_cost, cost_slope = _rank_local_likelihood_sums(arrays, group, n_groups,
                                                                fixed_a_sq)
    elif (_on_device() and not _split_invariant_job()
          and (group.size == 0 or np.all(np.diff(group) >= 0))):
        # the scaling job's device: the arrays copied once, every evaluation of b there
        # (kernels.cuda.error_model; the Ih table's observations are sorted by group)
        from ..kernels.cuda.error_model import DeviceErrorModelSums

        from ..backends.cuda_job_table import error_model_upload

        device = DeviceErrorModelSums(arrays[0], arrays[1], arrays[2], arrays[3], arrays[4],
                                      group, upload=error_model_upload())

        def a_sq_and_cost(b):  # noqa: F811 (the device twin)
            return device.a_sq_and_cost(float(b), fixed_a_sq)

        def cost_slope(b):  # noqa: F811 (the device twin)
            return device.cost_slope(float(b), fixed_a_sq)

    # each b's sums once: a^2 at the end is wanted at Brent's b, already evaluated there
    # when the polish keeps it (1 of ~25 evaluations of ~4e5 rows); the same values
    evaluate = a_sq_and_cost
    evaluated = {}

    def a_sq_and_cost(b):  # noqa: F811 (memoised)
        b = float(b)
        if b not in evaluated:
            evaluated[b] = evaluate(b)
        return evaluated[b]

    if fixed_b is not None:
        b = float(fixed_b)
    else:
        def f(x):
            value = a_sq_and_cost(x)[1]
            return value if np.isfinite(value) else np.inf

        lo, x, fx, hi = _bracket_minimum(f, DEFAULT_B)
        b = abs(float(_brent_minimise(f, lo, hi, x, fx)))
        b = _polish_stationary_point(cost_slope, b, lambda x: a_sq_and_cost(x)[1])
    return float(np.sqrt(a_sq_and_cost(b)[0])), b


def _rank_local_likelihood_sums(arrays, group, n_groups, fixed_a_sq):
    """a_sq_and_cost and cost_slope of refine_maximum_likelihood in a rank-local MPI job
    (issue 11): this rank's observations are a contiguous run of the one-process order
    (friedel_pair_layout), so each sum over observations is continued from rank to rank
    (rank_local.sequential_over_ranks: the bits of the one-pass kernels), its total known
    on every rank; the units are computed locally first, so that only the additions run one
    rank after another. Per evaluation of b: two passes of one or two floats."""
    from ..backends import rank_local
    from ..kernels import error_model_ml as kernels

    intensity, variance, g, share, residual_sq = arrays
    n = rank_local.total(group.size)
    unit = np.empty(group.size)
    unit_slope = np.empty(group.size)

    def profiled_a_sq(sum_ratio):
        if fixed_a_sq >= 0.0:
            return fixed_a_sq
        return sum_ratio / n if n > 0 else np.nan

    def a_sq_and_cost(b):
        # the terms (divisions, logarithms) on every rank at once; only their additions
        # pass from rank to rank (unit_slope is free scratch here)
        kernels.unit_kernel(intensity, variance, g, share, group, n_groups, float(b), unit)
        kernels.ratio_terms(residual_sq, unit, unit_slope)
        sum_ratio = float(rank_local.sequential_over_ranks(
            np.zeros(1), lambda t: kernels.add_sum(unit_slope, t))[0])
        a_sq = profiled_a_sq(sum_ratio)
        kernels.log_terms(unit, a_sq, unit_slope)
        sum_log = float(rank_local.sequential_over_ranks(
            np.zeros(1), lambda t: kernels.add_sum(unit_slope, t))[0])
        return float(a_sq), float(sum_log + sum_ratio / a_sq)

    def cost_slope(b):
        kernels.unit_and_slope_kernel(intensity, variance, g, share, group, n_groups,
                                      float(b), unit, unit_slope)
        sum_ratio = float(rank_local.sequential_over_ranks(
            np.zeros(1), lambda t: kernels.add_ratio_sum(residual_sq, unit, t))[0])
        a_sq = profiled_a_sq(sum_ratio)
        sums = rank_local.sequential_over_ranks(
            np.zeros(2), lambda t: kernels.add_slope_sums(residual_sq, unit, unit_slope, t))
        return float(sums[0] - sums[1] / a_sq)

    return a_sq_and_cost, cost_slope


SLOPE_POLISH_STEPS = 6
# b below this is b = 0 found to Brent's accuracy (a few B_XATOL): the slope (~ b) has no
# zero to polish towards but 0 itself; which tiny b the search ends on is rounding noise,
# and b^2 I^2 < 1e-16 I^2 changes no variance to the 1e-10 the devices agree on.
B_ZERO = 10.0 * B_XATOL


# How far (relative to b, plus B_XATOL) the polish may move Brent's b. Brent's b is
# sqrt(eps)-accurate only where the cost is curved enough: for a small, weakly determined b its
# cost differences near the minimum fall below the rounding of the sums sooner, and Brent's b
# was seen 3e-6 (relative) from the slope's zero (the 1e6 sweep's final refinement, b = 0.0044:
# README issue 11). Within this window the cost is a parabola about its minimum, so the
# slope's zero found there is that minimum (checked against the cost as well).
POLISH_WINDOW = 1e-4


def _polish_stationary_point(slope, b, cost=None):
    """b refined from the Brent minimum by secant steps on d cost / d b = 0.

    Why: Brent locates a minimum from cost values, so only to ~sqrt(eps) relative at best:
    closer in, cost differences are below the rounding of a sum over every observation, and
    which point wins depends on that rounding (the CPU kernel and its CUDA twin, which add in
    different orders, found b 1e-7 apart; two orders of the same observations in one process,
    3e-6 apart at b = 0.0044). The zero of the analytic slope is determined to ~eps, so the
    orders agree to ~1e-13 and the run's 1e-10 agreement holds. A step that leaves
    POLISH_WINDOW b + B_XATOL of Brent's b is not taken, nor a result whose cost (when `cost`
    is given) exceeds Brent's by more than rounding.
    """
    if not b > B_ZERO:
        return b
    window = POLISH_WINDOW * b + B_XATOL
    x0, s0 = b, slope(b)
    x1 = b * (1.0 + 1e-6)
    s1 = slope(x1)
    for _ in range(SLOPE_POLISH_STEPS):
        if not (np.isfinite(s0) and np.isfinite(s1)) or s1 == s0:
            break
        x2 = x1 - s1 * (x1 - x0) / (s1 - s0)
        if not abs(x2 - b) <= window:
            return b
        x0, s0, x1 = x1, s1, x2
        if abs(x1 - x0) <= 1e-15 * x1:
            break
        s1 = slope(x1)
    if not abs(x1 - b) <= window:
        return b
    if cost is not None:
        at_brent, polished = cost(b), cost(float(x1))
        if not polished <= at_brent + 1e-12 * abs(at_brent):
            return b
    return float(x1)


def refine_regression(table):
    """Linear fit y = a^2 x + a^2 b^2, x = sigma^2/I^2, y = group variance / I^2."""
    grp = table.group_of_observation()
    n_h = table.multiplicity()[grp].astype(float)
    ih = table.merged_intensity()[grp]
    resid_sq = (table.intensity - table.g * ih) ** 2
    group_var = np.bincount(grp, resid_sq, minlength=table.n_groups) / np.maximum(
        table.multiplicity() - 1, 1)
    i_sq = table.intensity ** 2
    x = table.variance / i_sq
    y = group_var[grp] / i_sq
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0 or intercept < 0:
        raise ErrorModelError("error model regression gave a negative a^2 or a^2 b^2")
    a = float(np.sqrt(slope))
    return a, float(np.sqrt(intercept) / a)


def refine_error_model(asu_indices, intensities, variances, gs, model=None, partialities=None,
                       min_partiality=None, min_ih=25.0, n_bins=10, minimisation="auto",
                       fixed_a=None, fixed_b=None, layout=None, stills=None, deviation="unbiased",
                       ih_table=None):
    """A refined BasicErrorModel, or raises ErrorModelError (the caller keeps its model).

    The inputs are per-dataset lists (suitable, non-outlier reflections) with ASU indices
    mapped anomalously; or, with `layout` (a GroupLayout of those reflections), the full
    per-dataset arrays the layout indexes; or, with `ih_table`, their unfiltered table
    (`unfiltered_table`), consumed by the filters.
    """
    if minimisation == "auto":
        minimisation = "likelihood" if deviation == "unbiased" else "individual"
    model = model or BasicErrorModel()
    table = filter_for_error_model(asu_indices, intensities, variances, gs, partialities,
                                   min_partiality, min_ih, layout, stills, model, deviation,
                                   ih_table)
    del ih_table
    if minimisation != "likelihood":
        # their bins' edges, the a-step's sort and the regression's fit read all
        # observations at once: a rank-local job gathers the filtered table (issue 11)
        table = gathered_table(table)
    a = model.a if fixed_a is None else fixed_a
    b = model.b if fixed_b is None else fixed_b
    if minimisation == "regression":
        ra, rb = refine_regression(table)
        return BasicErrorModel(fixed_a if fixed_a is not None else ra,
                               fixed_b if fixed_b is not None else rb)
    data = error_model_data(table, n_bins, deviation, bins=minimisation != "likelihood")
    if minimisation == "likelihood":
        return BasicErrorModel(*refine_maximum_likelihood(data, fixed_a, fixed_b))
    if data.n_bins < 1:
        raise ErrorModelError("no intensity bins for error model refinement")
    a, b, _ = refine_individual(data, a, b, fix_a=fixed_a is not None, fix_b=fixed_b is not None)
    return BasicErrorModel(a, b)


def error_model_groups(n_datasets, grouping="combined", error_model_group=None):
    """Lists of dataset positions, one list per error model."""
    if grouping == "individual":
        return [[d] for d in range(n_datasets)]
    if grouping == "grouped" and error_model_group:
        groups = [list(g) for g in error_model_group]
        zero_based = any(0 in g for g in groups)
        groups = [[d if zero_based else d - 1 for d in g] for g in groups]
        used = {d for g in groups for d in g}
        rest = [d for d in range(n_datasets) if d not in used]
        return groups + ([rest] if rest else [])
    return [list(range(n_datasets))]
