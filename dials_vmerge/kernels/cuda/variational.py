"""Variational (Wilson-prior Bayesian) merging on the device: the E-step of every group.

Twin of dials_vmerge.merging.variational.posterior_kernel and its helpers (truncated-normal
moments, composite Gauss-Legendre quadrature of the posterior, the Student-t reweighting).
One thread per group, no reduction, so each group's moments are the CPU kernel's up to the
device's rounding of exp/log/erfc. The CPU quadrature stores its nodes and log-densities in
a scratch array; here each node is recomputed in every pass (the same operations, so the
same values) instead of holding up to 240 doubles of local memory per thread.

The observations, their sigmas and the group offsets are copied to the device once per
merge (DeviceVariationalPosterior) and stay there for every EM iteration of Sigma(d); each
E-step uploads the prior means and brings back the per-group moments.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .launch import THREADS_PER_BLOCK, as_device
from .launch import blocks as launch_blocks
from .merging import _inverse_variance_sums

CONTINUED_FRACTION_DEPTH = 200  # as merging.variational (the kernel layer does not import it)
SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@cuda.jit(device=True)
def _truncated_normal_standard_moments(m):
    alpha = -m
    if alpha < 5.0:
        tail = 0.5 * math.erfc(alpha * SQRT_HALF)
        hazard = INV_SQRT_2PI * math.exp(-0.5 * alpha * alpha) / tail
        return m + hazard, 1.0 + alpha * hazard - hazard * hazard
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
    return 1.0 / t1, (alpha + 4.0 / t2 - 3.0 / t3) / (t2 * t1 * t1)


@cuda.jit(device=True)
def _panels(m):
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
    return t_lo, (t_hi - t_lo) / n_panels, n_panels


@cuda.jit(device=True)
def _node(m, shape, nodes, weights, t_lo, width, p, j):
    """(t, log density + log quadrature weight) of node j of panel p."""
    a = t_lo + p * width
    b = a + width
    if p == 0 and t_lo == 0.0:
        u_hi = math.sqrt(b)
        u = 0.5 * u_hi * (nodes[j] + 1.0)
        tj = u * u
        log_jac = math.log(0.5 * u_hi * weights[j] * 2.0 * u)
    else:
        tj = a + 0.5 * width * (nodes[j] + 1.0)
        log_jac = math.log(0.5 * width * weights[j])
    return tj, (shape - 1.0) * math.log(tj) - 0.5 * (tj - m) ** 2 + log_jac


@cuda.jit(device=True)
def _standard_posterior_quadrature(m, shape, nodes, weights):
    t_lo, width, n_panels = _panels(m)
    n_nodes = nodes.shape[0]
    peak = -math.inf
    for p in range(n_panels):
        for j in range(n_nodes):
            _, lf = _node(m, shape, nodes, weights, t_lo, width, p, j)
            if lf > peak:
                peak = lf
    norm = 0.0
    sum_t = 0.0
    sum_root = 0.0
    for p in range(n_panels):
        for j in range(n_nodes):
            tj, lf = _node(m, shape, nodes, weights, t_lo, width, p, j)
            f = math.exp(lf - peak)
            norm += f
            sum_t += f * tj
            sum_root += f * math.sqrt(tj)
    mean_t = sum_t / norm
    mean_root = sum_root / norm
    var_t = 0.0
    var_root = 0.0
    for p in range(n_panels):
        for j in range(n_nodes):
            tj, lf = _node(m, shape, nodes, weights, t_lo, width, p, j)
            f = math.exp(lf - peak)
            var_t += f * (tj - mean_t) ** 2
            var_root += f * (math.sqrt(tj) - mean_root) ** 2
    return mean_t, var_t / norm, mean_root, var_root / norm


@cuda.jit(device=True)
def _posterior_from_sufficient(precision, weighted_sum, centric, prior_mean, nodes, weights,
                               want_amplitude):
    if centric:
        shape = 0.5
        rate = 1.0 / (2.0 * prior_mean)
    else:
        shape = 1.0
        rate = 1.0 / prior_mean
    if not precision > 0.0:
        if centric:
            return (prior_mean, 2.0 * prior_mean * prior_mean,
                    math.sqrt(2.0 * prior_mean / math.pi), prior_mean * (1.0 - 2.0 / math.pi))
        return (prior_mean, prior_mean * prior_mean, 0.5 * math.sqrt(math.pi * prior_mean),
                prior_mean * (1.0 - math.pi / 4.0))
    s = 1.0 / math.sqrt(precision)
    m = (weighted_sum - rate) * s
    mean_f = math.nan
    var_f = math.nan
    if centric:
        mean_t, var_t, mean_root, var_root = _standard_posterior_quadrature(m, shape, nodes,
                                                                            weights)
        mean_f = math.sqrt(s) * mean_root
        var_f = s * var_root
    else:
        mean_t, var_t = _truncated_normal_standard_moments(m)
        if want_amplitude:
            _, _, mean_root, var_root = _standard_posterior_quadrature(m, shape, nodes,
                                                                       weights)
            mean_f = math.sqrt(s) * mean_root
            var_f = s * var_root
    return s * mean_t, s * s * var_t, mean_f, var_f


@cuda.jit
def posterior_kernel(intensity, sigma, group_start, centric, prior_mean, dof,
                     max_t_iterations, nodes, weights, want_amplitude, mean_j, sd_j, mean_f,
                     sd_f):
    """Per group (one thread): posterior moments of J and F; dof <= 0: Gaussian."""
    for grp in range(cuda.grid(1), group_start.shape[0] - 1, cuda.gridsize(1)):
        start = group_start[grp]
        end = group_start[grp + 1]
        precision, weighted_sum, _ = _inverse_variance_sums(intensity, sigma, start, end)
        is_centric = centric[grp] != 0
        ej, vj, ef, vf = _posterior_from_sufficient(
            precision, weighted_sum, is_centric, prior_mean[grp], nodes, weights,
            want_amplitude and dof <= 0.0)
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
                ej, vj, ef, vf = _posterior_from_sufficient(
                    precision, weighted_sum, is_centric, prior_mean[grp], nodes, weights,
                    False)
                if abs(ej - last) <= 1e-10 * (abs(ej) + math.sqrt(vj)) or last_is_final:
                    break
            if want_amplitude:
                ej, vj, ef, vf = _posterior_from_sufficient(
                    precision, weighted_sum, is_centric, prior_mean[grp], nodes, weights, True)
        mean_j[grp] = ej
        sd_j[grp] = math.sqrt(max(vj, 0.0))
        mean_f[grp] = ef
        if want_amplitude:
            sd_f[grp] = math.sqrt(max(vf, 0.0))
        else:
            sd_f[grp] = math.nan


class DeviceVariationalPosterior:
    """The observations of one variational merge on the device; e_step per prior."""

    def __init__(self, intensity, sigma, group_start, centric, nodes, weights):
        group_start = np.ascontiguousarray(group_start, dtype=np.int64)
        self.n_groups = len(group_start) - 1
        self._intensity = as_device(intensity, np.float64)
        self._sigma = as_device(sigma, np.float64)
        self._group_start = as_device(group_start, np.int64)
        self._centric = cuda.to_device(np.ascontiguousarray(centric, dtype=np.uint8))
        self._nodes = cuda.to_device(np.ascontiguousarray(nodes, dtype=np.float64))
        self._weights = cuda.to_device(np.ascontiguousarray(weights, dtype=np.float64))
        size = max(self.n_groups, 1)
        self._out = [cuda.device_array(size) for _ in range(4)]

    def e_step(self, prior_mean, dof, max_t_iterations, want_amplitude):
        """(mean J, SD J, mean F, SD F) per group as numpy (the CPU kernel's return)."""
        n = self.n_groups
        if n == 0:
            return tuple(np.zeros(0) for _ in range(4))
        posterior_kernel[launch_blocks(n), THREADS_PER_BLOCK](
            self._intensity, self._sigma, self._group_start, self._centric,
            cuda.to_device(np.ascontiguousarray(prior_mean, dtype=np.float64)), float(dof),
            int(max_t_iterations), self._nodes, self._weights, bool(want_amplitude),
            *self._out)
        return tuple(a.copy_to_host()[:n] for a in self._out)
