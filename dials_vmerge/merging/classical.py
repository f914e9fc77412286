"""Inverse-variance weighted merging, as cctbx merge_equivalents / dials.merge do it.

Observations are the scaled I/g and sigma/g. Within a group, observations whose sigma is
not above 1e-6 of the group's largest sigma are left out of the mean (cctbx's
sigma_dynamic_range); a single usable observation keeps its own sigma; otherwise the merged
sigma is sqrt(1/sum w), or with `use_internal_variance` the larger of that and the weighted
sample spread over n.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..kernels.merging import inverse_variance_sums  # noqa: F401  (moved to the kernel layer)
from ..kernels.size_dispatch import parallel_when_large

from .groups import GroupedObservations
from .merged import MergedIntensities

SIGMA_DYNAMIC_RANGE = 1e-6


@parallel_when_large
def inverse_variance_merge_kernel(
    intensity, sigma, group_start, sigma_dynamic_range, use_internal_variance
):
    """Per group: weighted mean, merged sigma. Inputs in sorted group order."""
    n_groups = group_start.shape[0] - 1
    mean = np.zeros(n_groups)
    merged_sigma = np.zeros(n_groups)
    for g in prange(n_groups):
        start = group_start[g]
        end = group_start[g + 1]
        max_sigma = 0.0
        for i in range(start, end):
            if sigma[i] > max_sigma:
                max_sigma = sigma[i]
        threshold = max_sigma * sigma_dynamic_range
        n_used = 0
        sum_w = 0.0
        sum_wi = 0.0
        last_sigma = 0.0
        for i in range(start, end):
            if sigma[i] > threshold:
                w = 1.0 / (sigma[i] * sigma[i])
                sum_w += w
                sum_wi += w * intensity[i]
                n_used += 1
                last_sigma = sigma[i]
        if n_used == 0:
            continue
        if n_used == 1:
            mean[g] = sum_wi / sum_w
            merged_sigma[g] = last_sigma
            continue
        m = sum_wi / sum_w
        mean[g] = m
        external_variance = 1.0 / sum_w
        if use_internal_variance:
            sum_w_sq = 0.0
            sum_w_delta_sq = 0.0
            for i in range(start, end):
                if sigma[i] > threshold:
                    w = 1.0 / (sigma[i] * sigma[i])
                    sum_w_sq += w * w
                    sum_w_delta_sq += w * (intensity[i] - m) ** 2
            # gsl_stats_wvariance: the unbiased weighted variance, divided by n
            internal_variance = sum_w / (sum_w * sum_w - sum_w_sq) * sum_w_delta_sq / n_used
            merged_sigma[g] = np.sqrt(max(internal_variance, external_variance))
        else:
            merged_sigma[g] = np.sqrt(external_variance)
    return mean, merged_sigma


@parallel_when_large
def deviation_sums_kernel(intensity, group_start, mean):
    """Per group: sum |I - mean| and sum I (the Rmerge numerator and denominator terms)."""
    n_groups = group_start.shape[0] - 1
    abs_dev = np.zeros(n_groups)
    total = np.zeros(n_groups)
    for g in prange(n_groups):
        s_dev = 0.0
        s_tot = 0.0
        for i in range(group_start[g], group_start[g + 1]):
            s_dev += abs(intensity[i] - mean[g])
            s_tot += intensity[i]
        abs_dev[g] = s_dev
        total[g] = s_tot
    return abs_dev, total


def merge_sums(i_sorted, s_sorted, group_start, sigma_dynamic_range, use_internal_variance,
               sources=None, pass_name="merging"):
    """inverse_variance_merge_kernel on the scaling job's device (compute.device=cuda:
    kernels.cuda.merging, backends.run_device.pass_device). sources: (groups, intensity,
    sigma) that i_sorted and s_sorted were gathered from; on the device their resident copies
    are used instead (backends.cuda_job_table: uploaded once per job)."""
    from ..backends.run_device import pass_device

    if pass_device() == "cuda":
        from ..kernels.cuda.merging import inverse_variance_merge

        if sources is not None:
            from ..backends.cuda_job_table import merging_columns

            i_sorted, s_sorted, group_start = merging_columns(*sources, pass_name=pass_name)
        return inverse_variance_merge(i_sorted, s_sorted, group_start, sigma_dynamic_range,
                                      use_internal_variance)
    return inverse_variance_merge_kernel(i_sorted, s_sorted, group_start, sigma_dynamic_range,
                                         use_internal_variance)


def deviation_sums(i_sorted, group_start, mean, sources=None, pass_name="merging statistics"):
    """deviation_sums_kernel on the scaling job's device (as merge_sums; sources: (groups,
    intensity))."""
    from ..backends.run_device import pass_device

    if pass_device() == "cuda":
        from ..kernels.cuda.merging import deviation_sums as device_deviation_sums

        if sources is not None:
            from ..backends.cuda_job_table import merging_columns

            i_sorted, _, group_start = merging_columns(*sources, pass_name=pass_name)
        from ..backends.cuda_statistics import keep_deviation_sums

        return device_deviation_sums(i_sorted, group_start, mean, keep_deviation_sums)
    return deviation_sums_kernel(i_sorted, group_start, mean)


def merge_classical(
    groups: GroupedObservations, intensity, sigma, use_internal_variance: bool = False
) -> MergedIntensities:
    """Inverse-variance merge of observations given in the caller's row order."""
    i_sorted = groups.gather(np.asarray(intensity, dtype=np.float64))
    s_sorted = groups.gather(np.asarray(sigma, dtype=np.float64))
    mean, merged_sigma = merge_sums(
        i_sorted, s_sorted, groups.group_start, SIGMA_DYNAMIC_RANGE, use_internal_variance,
        sources=(groups, intensity, sigma)
    )
    return MergedIntensities.from_groups(groups, mean, merged_sigma, "classical")
