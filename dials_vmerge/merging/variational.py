"""Exact Bayesian merging with a Wilson prior (variational-merging.md section 7.3).

For unique reflection h with scaled observations I_i (sigma s_i), the true intensity J >= 0
has the Wilson prior
    acentric: p(J) = exp(-J / (eps Sigma)) / (eps Sigma)
    centric:  p(J) ~ J^(-1/2) exp(-J / (2 eps Sigma))     (Gamma(1/2, scale 2 eps Sigma))
and a Gaussian likelihood prod_i N(I_i | J, s_i^2). The posterior is
    p(J | I) ~ J^(a - 1) exp(-P (J - mu)^2 / 2),  J >= 0,
with P = sum w_i, w_i = 1/s_i^2, mu = (sum w_i I_i - rate) / P, a = 1 and rate = 1/(eps Sigma)
for acentrics, a = 1/2 and rate = 1/(2 eps Sigma) for centrics. In standard units
t = J sqrt(P), m = mu sqrt(P) the density is t^(a-1) exp(-(t - m)^2 / 2).

Acentrics: a normal truncated to t >= 0, mean and variance in closed form (Mills ratio;
for alpha = -m >= 5 a continued fraction arranged so the variance suffers no cancellation).
Centrics, and the amplitude F = sqrt(J) for both classes: composite Gauss-Legendre
quadrature in t over panels one standard unit wide (or 2/|m| for m < -2, where
the posterior is nearly exponential with rate |m|), the panel at t = 0 in u = sqrt(t) to
remove the J^(-1/2) singularity; variances are computed as central moments (two passes).

Sigma(d): empirical Bayes by EM in resolution bins (equal counts in 1/d^2): for both prior
families the M-step is Sigma_bin = mean over the bin of E[J]/eps.

Student-t likelihood (dof > 0): the Gaussian scale mixture I_i ~ N(J, s_i^2 / u_i),
u_i ~ Gamma(nu/2, nu/2); the E-step for u is E[u_i] = (nu + 1) / (nu + E[(I_i - J)^2] / s_i^2)
with E[(I_i - J)^2] = (I_i - E J)^2 + Var J, alternated with the closed-form J posterior.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .classical import inverse_variance_sums
from .groups import GroupedObservations
from .merged import MergedIntensities

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


def resolution_bins(dstar_sq: np.ndarray, n_bins: int, min_per_bin: int = 50) -> np.ndarray:
    """Bin number per reflection: equal counts in 1/d^2."""
    n = len(dstar_sq)
    n_bins = max(1, min(int(n_bins), n // min_per_bin if n >= min_per_bin else 1))
    order = np.argsort(dstar_sq, kind="stable")
    bin_of = np.empty(n, dtype=np.int64)
    for b, members in enumerate(np.array_split(order, n_bins)):
        bin_of[members] = b
    return bin_of


def estimate_wilson_sigma(mean_j, epsilon, bin_of, n_bins):
    """M-step: Sigma per bin = mean of E[J]/eps."""
    sums = np.bincount(bin_of, weights=mean_j / epsilon, minlength=n_bins)
    counts = np.bincount(bin_of, minlength=n_bins)
    return sums / np.maximum(counts, 1)


def merge_variational(
    groups: GroupedObservations,
    intensity,
    sigma,
    dof: float = 0.0,
    n_bins: int = 20,
    max_em_iterations: int = 200,
    em_tolerance: float = 1e-6,
    wilson_sigma_per_group=None,
    max_t_iterations: int = 100,
) -> MergedIntensities:
    """Posterior mean/SD of J and F for every group.

    `wilson_sigma_per_group` fixes Sigma (e.g. from the full data when merging half
    datasets); otherwise Sigma(d) is estimated by EM in `n_bins` resolution bins."""
    i_sorted = groups.gather(np.asarray(intensity, dtype=np.float64))
    s_sorted = groups.gather(np.asarray(sigma, dtype=np.float64))
    centric = np.ascontiguousarray(groups.centric, dtype=np.bool_)
    epsilon = groups.epsilon
    t_dof = float(dof) if dof and dof > 0 else 0.0

    def e_step(prior_mean, want_amplitude):
        return posterior_kernel(
            i_sorted, s_sorted, groups.group_start, centric, np.ascontiguousarray(prior_mean),
            t_dof, max_t_iterations, GL_NODES, GL_WEIGHTS, want_amplitude,
        )

    from ..backends.run_device import pass_device

    if pass_device() == "cuda":
        # the scaling job's device: observations copied once, every E-step on the device
        from ..kernels.cuda.variational import DeviceVariationalPosterior

        device = DeviceVariationalPosterior(i_sorted, s_sorted, groups.group_start, centric,
                                            GL_NODES, GL_WEIGHTS)

        def e_step(prior_mean, want_amplitude):  # noqa: F811 (the device twin)
            return device.e_step(prior_mean, t_dof, max_t_iterations, want_amplitude)

    extra = {}
    if wilson_sigma_per_group is None:
        bin_of = resolution_bins(groups.dstar_sq, n_bins)
        n_used_bins = int(bin_of.max()) + 1 if len(bin_of) else 0
        # Start from the inverse-variance means, floored so the prior is proper.
        precision = np.add.reduceat(1.0 / s_sorted**2, groups.group_start[:-1]) if len(
            s_sorted) else np.zeros(0)
        weighted = np.add.reduceat(i_sorted / s_sorted**2, groups.group_start[:-1]) if len(
            s_sorted) else np.zeros(0)
        classical = weighted / precision
        wilson_sigma = estimate_wilson_sigma(classical, epsilon, bin_of, n_used_bins)
        floor = _positive_floor(classical / epsilon)
        wilson_sigma = np.maximum(wilson_sigma, floor)
        iterations = 0
        for iterations in range(1, max_em_iterations + 1):
            mean_j, _, _, _ = e_step(epsilon * wilson_sigma[bin_of], False)
            updated = np.maximum(estimate_wilson_sigma(mean_j, epsilon, bin_of, n_used_bins),
                                 floor * 1e-6)
            change = np.max(np.abs(updated / wilson_sigma - 1.0)) if len(updated) else 0.0
            wilson_sigma = updated
            if change < em_tolerance:
                break
        sigma_per_group = wilson_sigma[bin_of]
        extra.update(wilson_sigma_bins=wilson_sigma, em_iterations=iterations, bin_of=bin_of)
    else:
        sigma_per_group = np.asarray(wilson_sigma_per_group, dtype=np.float64)
    mean_j, sd_j, mean_f, sd_f = e_step(epsilon * sigma_per_group, True)
    extra["wilson_sigma_per_group"] = sigma_per_group
    return MergedIntensities.from_groups(
        groups, mean_j, sd_j, "variational", amplitude=mean_f, amplitude_sigma=sd_f, extra=extra
    )


def _positive_floor(values):
    positive = values[values > 0]
    return 1e-3 * positive.mean() if len(positive) else 1.0


def posterior_moments(intensity, sigma, centric: bool, prior_mean: float, dof: float = 0.0):
    """Posterior (E J, SD J, E F, SD F) of one reflection from its observations."""
    intensity = np.atleast_1d(np.asarray(intensity, dtype=np.float64))
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    mean_j, sd_j, mean_f, sd_f = posterior_kernel(
        intensity, sigma, np.array([0, len(intensity)], dtype=np.int64),
        np.array([centric], dtype=np.bool_), np.array([float(prior_mean)]),
        float(dof), 100, GL_NODES, GL_WEIGHTS, True,
    )
    return mean_j[0], sd_j[0], mean_f[0], sd_f[0]
