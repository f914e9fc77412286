"""Classical merging and the merging-statistics sums on the device.

Twins of dials_vmerge.merging.classical's inverse_variance_merge_kernel (inverse-variance
weighted mean and merged sigma per group, sigma dynamic range, optional internal variance)
and deviation_sums_kernel (per group sum |I - mean| and sum I, the Rmerge terms). One thread
per group walks the group's observations in order, as the CPU kernel does: no reduction, so
the results are the CPU kernel's to rounding of the same operations (bitwise in practice).
Observations in sorted group order; group_start the offsets.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK, as_device
from .launch import blocks as launch_blocks


@cuda.jit(device=True)
def _merge_group(intensity, sigma, group_start, sigma_dynamic_range, use_internal_variance,
                 mean, merged_sigma, grp):
    start = group_start[grp]
    end = group_start[grp + 1]
    mean[grp] = 0.0
    merged_sigma[grp] = 0.0
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
        return
    if n_used == 1:
        mean[grp] = sum_wi / sum_w
        merged_sigma[grp] = last_sigma
        return
    m = sum_wi / sum_w
    mean[grp] = m
    external_variance = 1.0 / sum_w
    if use_internal_variance:
        sum_w_sq = 0.0
        sum_w_delta_sq = 0.0
        for i in range(start, end):
            if sigma[i] > threshold:
                w = 1.0 / (sigma[i] * sigma[i])
                sum_w_sq += w * w
                sum_w_delta_sq += w * (intensity[i] - m) ** 2
        internal_variance = sum_w / (sum_w * sum_w - sum_w_sq) * sum_w_delta_sq / n_used
        merged_sigma[grp] = math.sqrt(max(internal_variance, external_variance))
    else:
        merged_sigma[grp] = math.sqrt(external_variance)


@cuda.jit
def inverse_variance_merge_kernel(intensity, sigma, group_start, sigma_dynamic_range,
                                  use_internal_variance, mean, merged_sigma):
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        _merge_group(intensity, sigma, group_start, sigma_dynamic_range,
                     use_internal_variance, mean, merged_sigma, grp)


@cuda.jit
def deviation_sums_kernel(intensity, group_start, mean, abs_dev, total):
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        s_dev = 0.0
        s_tot = 0.0
        for i in range(group_start[grp], group_start[grp + 1]):
            s_dev += abs(intensity[i] - mean[grp])
            s_tot += intensity[i]
        abs_dev[grp] = s_dev
        total[grp] = s_tot


def inverse_variance_merge(intensity, sigma, group_start, sigma_dynamic_range,
                           use_internal_variance):
    """(mean, merged sigma) per group as numpy: the CPU kernel's call, on the device."""
    n_groups = len(group_start) - 1
    mean = cuda.device_array(max(n_groups, 1))
    merged_sigma = cuda.device_array(max(n_groups, 1))
    if n_groups:
        inverse_variance_merge_kernel[launch_blocks(n_groups), THREADS_PER_BLOCK](
            as_device(intensity, np.float64),
            as_device(sigma, np.float64),
            as_device(group_start, np.int64),
            float(sigma_dynamic_range), bool(use_internal_variance), mean, merged_sigma)
    return mean.copy_to_host()[:n_groups], merged_sigma.copy_to_host()[:n_groups]


def deviation_sums(intensity, group_start, mean, keep=None):
    """(sum |I - mean|, sum I) per group as numpy, on the device. keep(host abs_dev, host
    total, device abs_dev, device total): told of the device copies (the statistics' shell
    sums read them there)."""
    n_groups = len(group_start) - 1
    abs_dev = cuda.device_array(max(n_groups, 1))
    total = cuda.device_array(max(n_groups, 1))
    if n_groups:
        deviation_sums_kernel[launch_blocks(n_groups), THREADS_PER_BLOCK](
            as_device(intensity, np.float64),
            as_device(group_start, np.int64),
            cuda.to_device(np.ascontiguousarray(mean, dtype=np.float64)), abs_dev, total)
    host = abs_dev.copy_to_host()[:n_groups], total.copy_to_host()[:n_groups]
    if keep is not None:
        keep(*host, abs_dev[:n_groups], total[:n_groups])
    return host


@cuda.jit(device=True)
def _inverse_variance_sums(intensity, sigma, start, end):
    """(sum w, sum w I, n) over start:end with sigma > 0 (twin of
    merging.classical.inverse_variance_sums)."""
    sum_w = 0.0
    sum_wi = 0.0
    n_usable = 0
    for i in range(start, end):
        if sigma[i] > 0.0:
            w = 1.0 / (sigma[i] * sigma[i])
            sum_w += w
            sum_wi += w * intensity[i]
            n_usable += 1
    return sum_w, sum_wi, n_usable


@cuda.jit
def student_t_merge_kernel(intensity, sigma, group_start, dof, sigma_scale, info_to_variance,
                           gaussian_variance_factor, max_iterations, tolerance,
                           min_observations, mean, merged_sigma, used_fallback):
    """Twin of merging.robust.student_t_merge_kernel: per group (one thread) the IRLS
    t-likelihood location, its calibrated sigma and the fallback flag (uint8)."""
    scale_sq = sigma_scale * sigma_scale
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        start = group_start[grp]
        end = group_start[grp + 1]
        mean[grp] = 0.0
        merged_sigma[grp] = 0.0
        used_fallback[grp] = 0
        sum_w, sum_wi, n_usable = _inverse_variance_sums(intensity, sigma, start, end)
        if sum_w == 0.0:
            continue
        inverse_variance_sum = sum_w
        mu = sum_wi / sum_w
        if n_usable < min_observations:
            mean[grp] = mu
            merged_sigma[grp] = 1.0 / math.sqrt(inverse_variance_sum)
            continue
        for _ in range(max_iterations):
            sum_w = 0.0
            sum_wi = 0.0
            for i in range(start, end):
                if sigma[i] > 0.0:
                    s2 = sigma[i] * sigma[i]
                    r2 = (intensity[i] - mu) ** 2 / (scale_sq * s2)
                    w = (dof + 1.0) / (dof + r2) / s2
                    sum_w += w
                    sum_wi += w * intensity[i]
            new_mu = sum_wi / sum_w
            step = abs(new_mu - mu)
            mu = new_mu
            if step <= tolerance * (abs(mu) + 1.0 / math.sqrt(sum_w)):
                break
        observed = 0.0
        for i in range(start, end):
            if sigma[i] > 0.0:
                s2 = scale_sq * sigma[i] * sigma[i]
                r2 = (intensity[i] - mu) ** 2 / s2
                observed += (dof + 1.0) * (dof - r2) / (s2 * (dof + r2) ** 2)
        mean[grp] = mu
        gaussian_variance = gaussian_variance_factor / inverse_variance_sum
        if observed > 0.0 and info_to_variance / observed < 10.0 * gaussian_variance:
            merged_sigma[grp] = math.sqrt(info_to_variance / observed)
        else:
            merged_sigma[grp] = math.sqrt(gaussian_variance)
            used_fallback[grp] = 1


def student_t_merge(intensity, sigma, group_start, dof, sigma_scale, info_to_variance,
                    gaussian_variance_factor, max_iterations, tolerance, min_observations):
    """(mean, sigma, fallback) per group as numpy: the CPU kernel's call, on the device."""
    n_groups = len(group_start) - 1
    mean = cuda.device_array(max(n_groups, 1))
    merged_sigma = cuda.device_array(max(n_groups, 1))
    fallback = cuda.device_array(max(n_groups, 1), dtype=np.uint8)
    if n_groups:
        student_t_merge_kernel[launch_blocks(n_groups), THREADS_PER_BLOCK](
            as_device(intensity, np.float64),
            as_device(sigma, np.float64),
            as_device(group_start, np.int64), float(dof),
            float(sigma_scale), float(info_to_variance), float(gaussian_variance_factor),
            int(max_iterations), float(tolerance), int(min_observations), mean, merged_sigma,
            fallback)
    return (mean.copy_to_host()[:n_groups], merged_sigma.copy_to_host()[:n_groups],
            fallback.copy_to_host()[:n_groups].astype(bool))
