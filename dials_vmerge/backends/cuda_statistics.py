"""compute.device=cuda: CC1/2 and CCanom of the merging statistics on the device.

The per-observation part (each group's random halves, kernels.cuda.statistics) reads the job
table's resident I, sigma and permutations (backends.cuda_job_table: the merges of the same
statistics call put them there); the correlation of a shell is a fixed-order reduction on the
device. What crosses the bus per shell: the shell's group numbers and the draw each group
starts at (per unique reflection), and six sums back.
"""

from __future__ import annotations

import numpy as np


def _counted_put():
    from .cuda_job_table import current_job_table

    store = current_job_table()

    def put(array):
        with store.counting("merging statistics"):
            return store.put(array)

    return put


def _half_means(prep, groups, order, weighted):
    from ..kernels.cuda.statistics import half_split_means, split_draws
    from .cuda_job_table import split_stream, statistics_columns

    order = np.ascontiguousarray(order, dtype=np.int64)
    intensity, sigma, permutation, group_start = statistics_columns(groups, prep.intensity,
                                                                    prep.sigma)
    # the host scan of the draws (group sizes and the odd-size draws only)
    first_draw, n_first_half = split_draws(groups.group_start, order, prep.uniforms)
    uniforms = split_stream(len(prep.uniforms))
    return half_split_means(intensity, sigma, permutation, group_start, order, first_draw,
                            n_first_half, uniforms, weighted, _counted_put())


def cc_half(prep, order):
    """(CC1/2, number of groups with n > 1) over the groups in order (sorted group numbers
    of prep.groups), weighted half means: merging.statistics._cc_half's values."""
    from ..kernels.cuda.statistics import pearson

    h1, h2 = _half_means(prep, prep.groups, order, True)
    return pearson(h1, h2, _counted_put())


def cc_anom(prep, anom_order, plus, minus):
    """(CCanom, number of pairs) of the Bijvoet pairs (plus[j], minus[j]) (anomalous group
    numbers, both in anom_order, which is sorted), plain half means: the differences
    I+ - I- of each half over the pairs whose halves both exist."""
    from ..kernels.cuda.statistics import pair_differences, pearson

    put = _counted_put()
    h1, h2 = _half_means(prep, prep.anom, anom_order, False)
    first = np.searchsorted(anom_order, plus).astype(np.int64)
    second = np.searchsorted(anom_order, minus).astype(np.int64)
    d1 = pair_differences(h1, first, second, put)
    d2 = pair_differences(h2, first, second, put)
    return pearson(d1, d2, put)



def keep_deviation_sums(host_abs_dev, host_total, device_abs_dev, device_total):
    """merging.classical.deviation_sums on the device: its per-group sums stay there for the
    shell sums (rmerge_sums), known by their host copies."""
    from .cuda_job_table import current_job_table

    current_job_table().deviation_sums = (host_abs_dev, host_total, device_abs_dev,
                                          device_total)


def rmerge_sums(prep, group_sel):
    """(sum |I - <I>|, sum sqrt(n/(n-1)) |I - <I>|, sum sqrt(1/(n-1)) |I - <I>|, sum I) over
    the shell's groups with n > 1: merging.statistics._intensity_statistics's sums, from the
    device copies of prep's per-group deviation sums (uploaded if these are not they)."""
    from ..kernels.cuda.statistics import rmerge_sums as device_rmerge_sums
    from .cuda_job_table import current_job_table, statistics_columns

    store = current_job_table()
    put = _counted_put()
    kept = getattr(store, "deviation_sums", None)
    if kept is not None and kept[0] is prep.abs_dev and kept[1] is prep.total:
        abs_dev, total = kept[2], kept[3]
    else:
        abs_dev, total = put(prep.abs_dev), put(prep.total)
    _, _, _, group_start = statistics_columns(prep.groups, prep.intensity, prep.sigma)
    groups = (np.flatnonzero(group_sel) if group_sel.dtype == bool
              else np.asarray(group_sel)).astype(np.int64)
    return device_rmerge_sums(abs_dev, total, group_start, groups, put)
