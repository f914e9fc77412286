"""CPU kernels of robust and variational merging, in the kernel layer (numpy and numba
alone, no cctbx) so that benchmarks/gpu_check.py compares their CUDA twins
(kernels/cuda/merging.py, kernels/cuda/variational.py) with them on machines without cctbx.
merging/robust.py and merging/variational.py hold the models, their docstrings and the
callers; the formulas are documented there.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

@njit(cache=True)
def inverse_variance_sums(intensity, sigma, start, end):
    """(sum w, sum w I, n) over observations start:end with sigma > 0, w = 1/sigma^2."""
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



@njit(cache=True, parallel=True)
def student_t_merge_kernel(
    intensity, sigma, group_start, dof, sigma_scale, info_to_variance, gaussian_variance_factor,
    max_iterations, tolerance, min_observations
):
    """Per group: t-likelihood location (IRLS), calibrated sigma, fallback flag.

    info_to_variance = (nu + 1) A / B and gaussian_variance_factor = A / B^2 (docstring)."""
    n_groups = group_start.shape[0] - 1
    mean = np.zeros(n_groups)
    merged_sigma = np.zeros(n_groups)
    used_fallback = np.zeros(n_groups, dtype=np.bool_)
    scale_sq = sigma_scale * sigma_scale
    for g in prange(n_groups):
        start = group_start[g]
        end = group_start[g + 1]
        sum_w, sum_wi, n_usable = inverse_variance_sums(intensity, sigma, start, end)
        if sum_w == 0.0:
            continue
        inverse_variance_sum = sum_w
        mu = sum_wi / sum_w
        if n_usable < min_observations:
            mean[g] = mu
            merged_sigma[g] = 1.0 / np.sqrt(inverse_variance_sum)
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
            if step <= tolerance * (abs(mu) + 1.0 / np.sqrt(sum_w)):
                break
        observed = 0.0
        for i in range(start, end):
            if sigma[i] > 0.0:
                s2 = scale_sq * sigma[i] * sigma[i]
                r2 = (intensity[i] - mu) ** 2 / s2
                observed += (dof + 1.0) * (dof - r2) / (s2 * (dof + r2) ** 2)
        mean[g] = mu
        gaussian_variance = gaussian_variance_factor / inverse_variance_sum
        # "Clearly positive": the calibrated variance at most 10x the Gaussian one, else the
        # curvature is too flat or negative to give a usable sigma.
        if observed > 0.0 and info_to_variance / observed < 10.0 * gaussian_variance:
            merged_sigma[g] = np.sqrt(info_to_variance / observed)
        else:
            merged_sigma[g] = np.sqrt(gaussian_variance)
            used_fallback[g] = True
    return mean, merged_sigma, used_fallback


GL_NODES, GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
CONTINUED_FRACTION_DEPTH = 200
SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True)
def truncated_normal_standard_moments(m):
    """Mean and variance of N(m, 1) truncated to t >= 0."""
    alpha = -m
    if alpha < 5.0:
        tail = 0.5 * math.erfc(alpha * SQRT_HALF)
        hazard = INV_SQRT_2PI * math.exp(-0.5 * alpha * alpha) / tail
        mean = m + hazard
        var = 1.0 + alpha * hazard - hazard * hazard
        return mean, var
    # Mills-ratio continued fraction: T_k = alpha + (k + 1) / T_{k+1};
    # hazard = alpha + 1/T_1, variance = (alpha + 4/T_2 - 3/T_3) / (T_2 T_1^2).
    t_next = alpha
    t3 = alpha
    t2 = alpha
    for k in range(CONTINUED_FRACTION_DEPTH, 0, -1):
        t_k = alpha + (k + 1.0) / t_next
        if k == 3:
            t3 = t_k
        elif k == 2:
            t2 = t_k
        t_next = t_k
    t1 = t_next
    mean = 1.0 / t1  # m + hazard = -alpha + alpha + 1/T_1
    var = (alpha + 4.0 / t2 - 3.0 / t3) / (t2 * t1 * t1)
    return mean, var


@njit(cache=True)
def standard_posterior_quadrature(m, shape, nodes, weights):
    """E[t], Var[t], E[sqrt t], Var[sqrt t] for density ~ t^(shape-1) exp(-(t-m)^2/2), t>=0."""
    if m >= -1.0:
        width_target = 1.0
        t_lo = max(0.0, m - 14.0)
        t_hi = max(m, 0.0) + 14.0
    else:
        width_target = min(1.0, 2.0 / (-m))
        t_lo = 0.0
        t_hi = min(14.0, 60.0 / (-m))
    n_panels = int(math.ceil((t_hi - t_lo) / width_target - 1e-9))
    if n_panels < 1:
        n_panels = 1
    width = (t_hi - t_lo) / n_panels
    n_nodes = nodes.shape[0]
    total = n_panels * n_nodes
    t = np.empty(total)
    log_f = np.empty(total)
    k = 0
    for p in range(n_panels):
        a = t_lo + p * width
        b = a + width
        first_at_zero = p == 0 and t_lo == 0.0
        for j in range(n_nodes):
            if first_at_zero:
                # u = sqrt(t) on [0, sqrt(b)]: dt = 2u du removes t^(-1/2) at t = 0
                u_hi = math.sqrt(b)
                u = 0.5 * u_hi * (nodes[j] + 1.0)
                tj = u * u
                log_jac = math.log(0.5 * u_hi * weights[j] * 2.0 * u)
            else:
                tj = a + 0.5 * width * (nodes[j] + 1.0)
                log_jac = math.log(0.5 * width * weights[j])
            t[k] = tj
            log_f[k] = (shape - 1.0) * math.log(tj) - 0.5 * (tj - m) ** 2 + log_jac
            k += 1
    peak = log_f.max()
    norm = 0.0
    sum_t = 0.0
    sum_root = 0.0
    for k in range(total):
        f = math.exp(log_f[k] - peak)
        log_f[k] = f  # reuse as the normalised weight below
        norm += f
        sum_t += f * t[k]
        sum_root += f * math.sqrt(t[k])
    mean_t = sum_t / norm
    mean_root = sum_root / norm
    var_t = 0.0
    var_root = 0.0
    for k in range(total):
        f = log_f[k]
        var_t += f * (t[k] - mean_t) ** 2
        var_root += f * (math.sqrt(t[k]) - mean_root) ** 2
    return mean_t, var_t / norm, mean_root, var_root / norm


@njit(cache=True)
def posterior_from_sufficient(precision, weighted_sum, centric, prior_mean, nodes, weights,
                              want_amplitude):
    """Posterior (E J, Var J, E F, Var F) from P = sum w, b = sum w I and eps*Sigma."""
    if centric:
        shape = 0.5
        rate = 1.0 / (2.0 * prior_mean)
    else:
        shape = 1.0
        rate = 1.0 / prior_mean
    if not precision > 0.0:
        # No usable observation: the prior itself.
        if centric:
            return (prior_mean, 2.0 * prior_mean * prior_mean,
                    math.sqrt(2.0 * prior_mean / math.pi), prior_mean * (1.0 - 2.0 / math.pi))
        return (prior_mean, prior_mean * prior_mean, 0.5 * math.sqrt(math.pi * prior_mean),
                prior_mean * (1.0 - math.pi / 4.0))
    s = 1.0 / math.sqrt(precision)
    m = (weighted_sum - rate) * s  # mu / s with mu = (b - rate) / P
    mean_f = np.nan
    var_f = np.nan
    if centric:
        mean_t, var_t, mean_root, var_root = standard_posterior_quadrature(m, shape, nodes, weights)
        mean_f = math.sqrt(s) * mean_root
        var_f = s * var_root
    else:
        mean_t, var_t = truncated_normal_standard_moments(m)
        if want_amplitude:
            q_mean, q_var, mean_root, var_root = standard_posterior_quadrature(
                m, shape, nodes, weights
            )
            mean_f = math.sqrt(s) * mean_root
            var_f = s * var_root
    return s * mean_t, s * s * var_t, mean_f, var_f


@njit(cache=True, parallel=True)
def posterior_kernel(intensity, sigma, group_start, centric, prior_mean, dof, max_t_iterations,
                     nodes, weights, want_amplitude):
    """Per group posterior moments of J and F. Inputs in sorted group order; dof <= 0 means
    a Gaussian likelihood."""
    n_groups = group_start.shape[0] - 1
    mean_j = np.zeros(n_groups)
    sd_j = np.zeros(n_groups)
    mean_f = np.full(n_groups, np.nan)
    sd_f = np.full(n_groups, np.nan)
    for g in prange(n_groups):
        start = group_start[g]
        end = group_start[g + 1]
        precision, weighted_sum, _ = inverse_variance_sums(intensity, sigma, start, end)
        ej, vj, ef, vf = posterior_from_sufficient(
            precision, weighted_sum, centric[g], prior_mean[g], nodes, weights,
            want_amplitude and dof <= 0.0,
        )
        if dof > 0.0:
            for it in range(max_t_iterations):
                precision = 0.0
                weighted_sum = 0.0
                for i in range(start, end):
                    if sigma[i] > 0.0:
                        s2 = sigma[i] * sigma[i]
                        expected_sq = (intensity[i] - ej) ** 2 + vj
                        w = (dof + 1.0) / (dof + expected_sq / s2) / s2
                        precision += w
                        weighted_sum += w * intensity[i]
                last = ej
                last_is_final = it == max_t_iterations - 1
                ej, vj, ef, vf = posterior_from_sufficient(
                    precision, weighted_sum, centric[g], prior_mean[g], nodes, weights, False
                )
                if abs(ej - last) <= 1e-10 * (abs(ej) + math.sqrt(vj)) or last_is_final:
                    break
            if want_amplitude:
                ej, vj, ef, vf = posterior_from_sufficient(
                    precision, weighted_sum, centric[g], prior_mean[g], nodes, weights, True
                )
        mean_j[g] = ej
        sd_j[g] = math.sqrt(max(vj, 0.0))
        mean_f[g] = ef
        sd_f[g] = math.sqrt(max(vf, 0.0)) if want_amplitude else np.nan
    return mean_j, sd_j, mean_f, sd_f
