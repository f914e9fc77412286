"""Scaling by the exact marginal likelihood (variational-merging.md 7.1-7.5; issue 14).

For unique reflection h with observations I_i, weights u_i = w_i / s_i^2 (s_i^2 the error-model
variance, w_i the Student-t mixture weight, 1 for the Gaussian likelihood) and scales g_i(theta):

    L_h(theta) = int_0^inf p(J | eps_h Sigma(d_h)) prod_i N(I_i; g_i J, 1/u_i) dJ,

with the Wilson prior p(J): acentric Exp(mean M), centric Gamma(1/2, scale 2M), M = eps Sigma.
With P = sum u g^2, B = sum u g I, C = sum u I^2:
  acentric: b = B - 1/M, alpha = b / sqrt(P) and
      -2 log L_h = C - b^2/P + log P - log 2pi - 2 log Phi(alpha) + 2 log M
    (the posterior of J is N(b/P, 1/P) truncated to J >= 0: closed-form moments);
  centric: b = B - 1/(2M) and
      -2 log L_h = log(2 pi M) + C - 2 log int_0^inf J^(-1/2) exp(b J - P J^2 / 2) dJ,
    the integral and the posterior moments by 48-point Gauss-Legendre quadrature (in J around
    the peak when it is well inside J > 0, in F = sqrt(J) otherwise).
The Gaussian normalisers sum log(2 pi / u_i) do not depend on theta and are left out.

The target minimised over theta is phi = sum_h -2 log L_h + sum_k wr_k p_k^2 (the DIALS
restraints as Gaussian log-priors, on the same -2 log scale as least squares' chi^2). Its
gradient is the posterior expectation of the complete-data gradient (Fisher's identity):

    d phi / d g_i = -2 u_i (I_i m_h - g_i E[J_h^2]),   m_h = E[J_h | I, theta].

E-steps between rounds of LBFGS (minimise_with_e_steps), all closed form or quadrature:
  Sigma(d) by empirical Bayes: Sigma_bin = mean over the bin's groups of m_h / eps_h
    (equal-count bins of d*^2), iterated to its fixed point;
  Student-t (dof nu): w_i = (nu + 1) / (nu + u_i^0 E[(I_i - g_i J)^2]), u^0 = 1/s^2.
The DIALS basic error model is a parameter of this marginal likelihood (7.3.6): per
error-model group k (weighting.error_model.grouping),

    s_i^2 = a_k^2 (sigma_i^2 + (b_k Ihat_i)^2),   Ihat_i = g_i E[J_h]  (the plug-in intensity),

u_i = w_i / s_i^2, and (a, b) minimise the exact -2 log p(I | theta, a, b), which now keeps
the normalisers: sum_h -2 log L_h + sum_i log s_i^2. Ihat is the model's expected intensity
of the observation, updated at each E-step and fixed in between (as DIALS holds g Ih), not
the observed I: the observed intensity puts the observation's own noise into its variance
(positive fluctuations get larger s, negative ones smaller), which biases both the weights
and the log s term that makes a and b identifiable; g E[J] is also what the simulator's and
DIALS's b multiplies (the expected intensity). With alpha = a^2, c = b^2 and
E_i = E[(I_i - g_i J_h)^2 | I] (Fisher's identity again, d(-2 log L_h)/du_i = E_i):

    d phi / d alpha_k = sum_{i in k} (1 - u_i E_i) / alpha_k,
    d phi / d c_k     = sum_{i in k} Ihat_i^2 / (sigma_i^2 + c_k Ihat_i^2) (1 - u_i E_i),

so d phi/da = 2 a dphi/dalpha and d phi/db = 2 b dphi/dc. At the run's error-model steps
(after the first two rounds of theta and after the last, as DIALS orders them) (alpha, c)
are optimised with theta fixed (L-BFGS-B on the exact value and gradient, one kernel pass per
evaluation), alternating with Sigma(d) and Ihat; the rounds of theta in between keep a, b
and update Ihat at each E-step: block-coordinate maximisation of one likelihood. Refitting
a, b at every E-step inside the theta rounds as well reached the same a, b but worse scales
on the anomalous scenario (merged-I error 0.02756 against 0.02741, CCanom 0.925 against
0.930). The output (merged sigmas) applies the fitted a, b in dials.scale's form
a^2 (sigma^2 + (b I)^2), as for least squares.
Deterministic: fixed quadrature; every sum over groups is a fixed-block tree
(backends/block_sums.py: the job's read-time key blocks), over MPI ranks too, and the
per-bin sums one pass in group order, so a rank-local MPI job (issue 11: each rank its
own groups) has one process's bits for any nproc and number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..backends import rank_local
from ..backends.block_sums import fixed_block_bounds, key_block_sum
from .target import ScalingTarget
from .target import normal_equations as least_squares_normal_equations

LOG_2PI = math.log(2.0 * math.pi)
QUADRATURE_NODES = 48
QUADRATURE_WIDTH = 8.0  # posterior sds covered either side of the peak
TAIL_CONTINUED_FRACTION_TERMS = 60
TAIL_ALPHA = -5.0  # below: Mills ratio by its continued fraction
DEFAULT_RESOLUTION_BINS = 20
MIN_GROUPS_PER_BIN = 50
SIGMA_FIXED_POINT_ITERATIONS = 5
E_STEP_ROUNDS = 20
LIKELIHOOD_SMALL_STEPS = 3
ERROR_MODEL_ROUNDS_FIRST = 3  # (Ihat, a b, Sigma) rounds at the first E-step, 1 later
MAX_B = 1.0


@njit(cache=True)
def _acentric(p_sum, b_sum, c_sum, mean_prior):
    """(-2 log L_h, E[J], E[J^2]) for an acentric Wilson prior of mean mean_prior."""
    b = b_sum - 1.0 / mean_prior
    root_p = math.sqrt(p_sum)
    alpha = b / root_p
    mu = b / p_sum
    if alpha > TAIL_ALPHA:
        phi_cdf = 0.5 * math.erfc(-alpha / math.sqrt(2.0))
        log_cdf = math.log(phi_cdf)
        lam = math.exp(-0.5 * alpha * alpha - 0.5 * LOG_2PI) / phi_cdf
        var_factor = 1.0 - lam * (lam + alpha)
    else:
        # Phi(alpha) = phi(t) R(t), t = -alpha, R = 1/(t + c), c = 1/(t + 2/(t + 3/...))
        t = -alpha
        d = t
        for k in range(TAIL_CONTINUED_FRACTION_TERMS, 1, -1):
            d = t + k / d
        c = 1.0 / d
        lam = t + c
        var_factor = 1.0 - lam * c  # 1 - lambda (lambda + alpha) without cancellation in lambda
        mean = mu + lam / root_p
        var = max(var_factor, 0.0) / p_sum
        # -2 log Phi(alpha) = t^2 + log 2pi + 2 log(t + c) and t^2 = b^2/P: the two cancel
        # exactly, and log P + 2 log(t + c) = 2 log(c sqrt(P) - b). Written out, the
        # difference of b^2/P and t^2 (both ~1e76 when g ~ 1e-38) was rounding noise.
        value = c_sum + 2.0 * math.log(c * root_p - b) + 2.0 * math.log(mean_prior)
        return value, mean, var + mean * mean
    mean = mu + lam / root_p
    var = max(var_factor, 0.0) / p_sum
    value = c_sum - b * b / p_sum + math.log(p_sum) - LOG_2PI - 2.0 * log_cdf \
        + 2.0 * math.log(mean_prior)
    return value, mean, var + mean * mean


@njit(cache=True)
def _centric(p_sum, b_sum, c_sum, mean_prior, nodes, weights):
    """(-2 log L_h, E[J], E[J^2]) for a centric Wilson prior (Gamma(1/2, 2 mean_prior))."""
    b = b_sum - 0.5 / mean_prior
    mu = b / p_sum
    sd = 1.0 / math.sqrt(p_sum)
    n = nodes.size
    log_f = np.empty(n)
    jv = np.empty(n)
    if mu - QUADRATURE_WIDTH * sd > 0.0:
        lo = mu - QUADRATURE_WIDTH * sd
        half = QUADRATURE_WIDTH * sd
        for k in range(n):
            j = mu + half * nodes[k]
            jv[k] = j
            log_f[k] = math.log(half * weights[k]) + b * j - 0.5 * p_sum * j * j \
                - 0.5 * math.log(j)
    else:
        j_max = max(mu, 0.0) + QUADRATURE_WIDTH * sd
        if b < 0.0:
            j_max = min(j_max, 30.0 / -b)
        f_max = math.sqrt(j_max)
        half = 0.5 * f_max
        for k in range(n):
            f = half * (nodes[k] + 1.0)
            j = f * f
            jv[k] = j
            # J^(-1/2) dJ = 2 dF
            log_f[k] = math.log(2.0 * half * weights[k]) + b * j - 0.5 * p_sum * j * j
    peak = log_f.max()
    total = 0.0
    s1 = 0.0
    s2 = 0.0
    for k in range(n):
        e = math.exp(log_f[k] - peak)
        total += e
        s1 += e * jv[k]
        s2 += e * jv[k] * jv[k]
    log_integral = peak + math.log(total)
    value = LOG_2PI + math.log(mean_prior) + c_sum - 2.0 * log_integral
    return value, s1 / total, s2 / total


@njit(cache=True)
def _group_posterior(intensity, u, g, lo, hi, centric, mean_prior, nodes, weights):
    p_sum = 0.0
    b_sum = 0.0
    c_sum = 0.0
    for i in range(lo, hi):
        ug = u[i] * g[i]
        p_sum += ug * g[i]
        b_sum += ug * intensity[i]
        c_sum += u[i] * intensity[i] * intensity[i]
    if p_sum <= 0.0:
        # g = 0 (exp underflow far out in a line search) or u = 0: the data say nothing
        # about J, whose posterior is its prior, and L_h is the limit g -> 0, prod N(I; 0, 1/u).
        # Leaving such a group out (value 0) made a collapse of all g to 0 look like a
        # minimum (the dose_decay model found it).
        second = (3.0 if centric else 2.0) * mean_prior * mean_prior
        return c_sum, mean_prior, second, True
    if centric:
        value, m, e2 = _centric(p_sum, b_sum, c_sum, mean_prior, nodes, weights)
    else:
        value, m, e2 = _acentric(p_sum, b_sum, c_sum, mean_prior)
    return value, m, e2, True


@njit(cache=True, parallel=True)
def likelihood_gradient_kernel(intensity, u, g, deriv_values, deriv_col, group_start,
                               centric, mean_prior, nodes, weights, chunk_start, phi_partial,
                               grad_partial):
    """Per chunk: sum_h -2 log L_h and its gradient over the free parameters."""
    n_chunks = chunk_start.size - 1
    n_slots = deriv_values.shape[1]
    n_par = grad_partial.shape[1]
    for c in prange(n_chunks):
        grad = np.zeros(n_par)
        phi = 0.0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            value, m, e2, ok = _group_posterior(intensity, u, g, lo, hi, centric[grp],
                                                mean_prior[grp], nodes, weights)
            if not ok:
                continue
            phi += value
            for i in range(lo, hi):
                factor = -2.0 * u[i] * (intensity[i] * m - g[i] * e2)
                for k in range(n_slots):
                    col = deriv_col[i, k]
                    if col >= 0:
                        grad[col] += factor * deriv_values[i, k]
        phi_partial[c] = phi
        grad_partial[c, :] = grad


@njit(cache=True, parallel=True)
def error_model_gradient_kernel(intensity, u, g, log_s_sq, c_factor, em_group, n_em_groups,
                                group_start, group_used, centric, mean_prior, nodes, weights,
                                chunk_start, phi_partial, grad_partial):
    """Per chunk: sum_h -2 log L_h + sum_i log s_i^2 and, per error-model group k, the sums
    of (1 - u_i E_i) (slot k) and c_factor_i (1 - u_i E_i) (slot n_em_groups + k), with
    E_i = E[(I_i - g_i J)^2] over the posterior of J_h."""
    for c in prange(chunk_start.size - 1):
        grad = np.zeros(2 * n_em_groups)
        phi = 0.0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            if not group_used[grp]:
                continue
            lo = group_start[grp]
            hi = group_start[grp + 1]
            value, m, e2, ok = _group_posterior(intensity, u, g, lo, hi, centric[grp],
                                                mean_prior[grp], nodes, weights)
            if not ok:
                continue
            phi += value
            for i in range(lo, hi):
                phi += log_s_sq[i]
                expected_sq = intensity[i] * intensity[i] - 2.0 * g[i] * intensity[i] * m \
                    + g[i] * g[i] * e2
                term = 1.0 - u[i] * expected_sq
                k = em_group[i]
                grad[k] += term
                grad[n_em_groups + k] += c_factor[i] * term
        phi_partial[c] = phi
        grad_partial[c, :] = grad


@njit(cache=True)
def block_observation_sums(values, group_start, chunk_start, out):
    """Per block of groups: the sum of `values` over its observations, in order."""
    for c in range(chunk_start.size - 1):
        total = 0.0
        for i in range(group_start[chunk_start[c]], group_start[chunk_start[c + 1]]):
            total += values[i]
        out[c] = total


@njit(cache=True, parallel=True)
def posterior_kernel(intensity, u, g, group_start, centric, mean_prior, nodes, weights,
                     mean_out, second_out):
    """E[J_h] and E[J_h^2] per group."""
    for grp in prange(group_start.size - 1):
        _, m, e2, _ = _group_posterior(intensity, u, g, group_start[grp], group_start[grp + 1],
                                       centric[grp], mean_prior[grp], nodes, weights)
        mean_out[grp] = m
        second_out[grp] = e2


@njit(cache=True, parallel=True)
def student_weights_kernel(intensity, u0, g, group_start, mean, second, dof, out):
    """w_i = (nu + 1) / (nu + u0_i E[(I_i - g_i J)^2]), E over the posterior of J_h."""
    for grp in prange(group_start.size - 1):
        m = mean[grp]
        e2 = second[grp]
        for i in range(group_start[grp], group_start[grp + 1]):
            expected_sq = intensity[i] * intensity[i] - 2.0 * g[i] * intensity[i] * m \
                + g[i] * g[i] * e2
            out[i] = (dof + 1.0) / (dof + u0[i] * max(expected_sq, 0.0))


def resolution_bins(dstar_sq, n_bins=DEFAULT_RESOLUTION_BINS, tie_key=None):
    """Equal-count bin of each group by d*^2 (at least MIN_GROUPS_PER_BIN per bin). Groups
    of equal d*^2 are ordered by tie_key (default: their position), so a bin edge among
    them does not depend on the order the groups are held in."""
    n = dstar_sq.size
    n_bins = max(1, min(n_bins, n // MIN_GROUPS_PER_BIN))
    order = np.argsort(dstar_sq, kind="stable") if tie_key is None else \
        np.lexsort((tie_key, dstar_sq))
    bins = np.empty(n, dtype=np.int64)
    for k, chunk in enumerate(np.array_split(order, n_bins)):
        bins[chunk] = k
    return bins, n_bins


@dataclass
class ErrorModelFit:
    """The basic error models fitted inside the likelihood: group[i] is the error-model group
    of observation i of the table, a and b the current values per group; fix_a/fix_b keep
    them (weighting.error_model.basic.a/b given, or minimisation=None)."""

    group: np.ndarray
    a: np.ndarray
    b: np.ndarray
    fix_a: bool = False
    fix_b: bool = False
    groups: list = None  # dataset positions of each group
    min_ih: float = 0.0  # a, b from groups with mean Ihat above this and multiplicity > 1
    # 1 where an observation is the Friedel mate (I-) of its ASU reflection, or None. With it,
    # a, b are fitted on I(+) and I(-) apart (as error_model.py's anomalous groups): scaling
    # merges Friedel mates, and the anomalous difference, read as noise proportional to I,
    # came out as b = 0.047 (the simulated Bijvoet ratio 0.05) with merged sigmas 12% too big.
    hand: np.ndarray = None

    @property
    def n_groups(self):
        return self.a.size


def error_model_fit(params, table, error_models, hand=None):
    """An ErrorModelFit for `table` (its dataset_id = position in error_models), or None when
    the run has no error model (weighting.error_model.error_model=None). hand: see
    ErrorModelFit."""
    from ..model.base import param
    from . import error_model as em

    if param(params, "weighting.error_model.error_model", "basic") in (None, "None"):
        return None
    groups = em.error_model_groups(len(error_models),
                                   param(params, "weighting.error_model.grouping", "combined"),
                                   param(params, "weighting.error_model.error_model_group"))
    group_of_dataset = np.zeros(len(error_models), dtype=np.int64)
    a, b = [], []
    for k, members in enumerate(groups):
        group_of_dataset[members] = k
        start = error_models[members[0]] or em.BasicErrorModel()
        a.append(abs(float(start.a)))
        b.append(abs(float(start.b)))
    no_refinement = param(params, "weighting.error_model.basic.minimisation", "auto") in (
        None, "None")
    return ErrorModelFit(
        np.ascontiguousarray(group_of_dataset[np.asarray(table.dataset_id, dtype=np.int64)]),
        np.array(a), np.array(b),
        no_refinement or param(params, "weighting.error_model.basic.a") is not None,
        no_refinement or param(params, "weighting.error_model.basic.b") is not None,
        groups, float(param(params, "weighting.error_model.basic.min_Ih", 25.0) or 0.0), hand)


class LikelihoodTarget(ScalingTarget):
    """The marginal-likelihood target over one IhTable (the ScalingTarget interface).

    space_group, unit_cell: for the centric flags, epsilons and d of the table's groups.
    dof: Student-t degrees of freedom, None for the Gaussian likelihood.
    error_model: an ErrorModelFit (s^2 with Ihat = g E[J] updated at each E-step), or None:
    the table's weights are then the fixed 1/s^2. fit_error_model: also refit a, b at each
    E-step (the run's error-model steps); False keeps them while theta is minimised.
    """

    def __init__(self, manager, ih_table, nproc=1, space_group=None, unit_cell=None, dof=None,
                 n_resolution_bins=DEFAULT_RESOLUTION_BINS, error_model=None,
                 fit_error_model=True):
        super().__init__(manager, ih_table, nproc)
        self.fused = None  # the fused physical pass computes the least-squares target only
        from ..merging.groups import unique_properties

        centric, epsilon, dstar_sq = unique_properties(ih_table.asu_index, space_group,
                                                       unit_cell)
        self.centric = np.ascontiguousarray(centric, dtype=np.bool_)
        self.epsilon = np.asarray(epsilon, dtype=np.float64)
        # issue 11: the bins are order statistics over all groups: in a rank-local job over
        # the ranks' groups gathered in rank order (the one-process group order). Ties of
        # d*^2 (I(+) and I(-) of one reflection, and others) go by the (h, k, l) order of the
        # groups' indices: the bins of the anomalous layout's (unique reflection, hand) order
        # are those of the (h, k, l) order (a bin edge among ties moved g by 3e-3 otherwise)
        dstar_sq = np.asarray(dstar_sq, dtype=np.float64)
        tie_key = None
        if ih_table.key_asu is not None:
            from ..backends.rank_partition import packed_keys

            tie_key = rank_local.gather_in_rank_order(packed_keys(ih_table.asu_index))
        bins, self.n_bins = resolution_bins(rank_local.gather_in_rank_order(dstar_sq),
                                            n_resolution_bins, tie_key)
        self.bins = np.ascontiguousarray(rank_local.own_part(bins, dstar_sq.size))
        self.dof = dof
        self.nodes, self.weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
        self.u0 = np.ascontiguousarray(ih_table.weight, dtype=np.float64)
        self.u = self.u0.copy()
        self.student_w = np.ones(ih_table.n_obs)
        self.error_model = error_model
        self.fit_error_model_in_e_steps = fit_error_model
        self.plug_intensity = None  # Ihat = g E[J], fixed between E-steps
        self.error_model_groups_used = None  # the groups a, b are fitted on
        self.sigma_bins = None
        self.mean_prior = None
        self.rmsd_offset = None

    # -- E-step --------------------------------------------------------------------------
    def _posteriors(self, g):
        t = self.table
        mean = np.empty(t.n_groups)
        second = np.empty(t.n_groups)
        posterior_kernel(t.intensity, self.u, g, t.group_start, self.centric, self.mean_prior,
                         self.nodes, self.weights, mean, second)
        return mean, second

    def _set_sigma(self, sigma_bins):
        self.sigma_bins = np.maximum(sigma_bins, 1e-12)
        self.mean_prior = np.ascontiguousarray(self.epsilon * self.sigma_bins[self.bins])

    def e_step(self, x):
        """Sigma(d) (empirical Bayes fixed point), the error model (a, b) by maximum
        likelihood and, for Student-t, the mixture weights."""
        g, _, _ = self._ell(x)
        t = self.table
        rounds = 1
        if self.mean_prior is None:
            # start from the weighted mean intensities (what least squares merges)
            ih = t.merged_intensity()
            self._set_sigma(self._bin_means(np.maximum(ih, 0.0) / self.epsilon))
            rounds = ERROR_MODEL_ROUNDS_FIRST
        self._sigma_fixed_point(g)
        if self.error_model is not None and self.fit_error_model_in_e_steps and not (
                self.error_model.fix_a and self.error_model.fix_b):
            for _ in range(rounds):
                self.set_plug_intensity(g)
                self.fit_error_model(g)
                self._sigma_fixed_point(g)
        elif self.error_model is not None:
            self.set_plug_intensity(g)
            self._apply_error_model()
        if self.dof is not None:
            mean, second = self._posteriors(g)
            w = np.empty(t.n_obs)
            student_weights_kernel(t.intensity, self.u0, g, t.group_start, mean, second,
                                   float(self.dof), w)
            self.student_w = w
            self.u = self.u0 * w
        # The stopping rule's scale (rmsd): phi less its value here plus least squares' chi^2
        # here, so that it starts at least squares' RMSD and moves as the fit does.
        self.rmsd_offset = None
        phi, _ = self.value_and_gradient(x)
        grp = t.group_of_observation()
        ug = self.u * g
        ih = np.bincount(grp, ug * t.intensity, minlength=t.n_groups) / np.maximum(
            np.bincount(grp, ug * g, minlength=t.n_groups), 1e-300)
        chi_sq = self._observation_sum(self.u * (t.intensity - g * ih[grp]) ** 2)
        self.rmsd_offset = phi - chi_sq

    def _sigma_fixed_point(self, g):
        for _ in range(SIGMA_FIXED_POINT_ITERATIONS):
            mean, _ = self._posteriors(g)
            self._set_sigma(self._bin_means(mean / self.epsilon))

    # -- the error model inside the likelihood -------------------------------------------
    def set_plug_intensity(self, g):
        """Ihat_i = g_i E[J_h]: the expected intensity of each observation now."""
        mean, _ = self._posteriors(g)
        grp = self.table.group_of_observation()
        self.plug_intensity = g * mean[grp]
        t = self.table
        n_h = t.multiplicity()
        mean_plug = np.bincount(grp, self.plug_intensity, minlength=t.n_groups) / np.maximum(
            n_h, 1)
        min_ih = self.error_model.min_ih if self.error_model is not None else 0.0
        parent_used = mean_plug > min_ih
        hand = None if self.error_model is None else self.error_model.hand
        if hand is None:
            self._em_order = None
            self._em_parent = np.arange(t.n_groups)
            self._em_group_start = t.group_start
            sizes = n_h
        else:
            # observations sorted by (group, hand): the error model's groups are I(+), I(-)
            order = np.lexsort((np.asarray(hand, dtype=np.int64), grp))
            key = grp[order] * 2 + np.asarray(hand, dtype=np.int64)[order]
            # (no group at all where a rank of a rank-local job holds no row of the table)
            starts = np.flatnonzero(np.r_[key.size > 0, key[1:] != key[:-1]])
            self._em_order = order
            self._em_parent = grp[order][starts]
            self._em_group_start = np.append(starts, t.n_obs).astype(t.group_start.dtype)
            sizes = np.diff(self._em_group_start)
        self.error_model_groups_used = np.ascontiguousarray(
            (sizes > 1) & parent_used[self._em_parent])

    def _error_model_terms(self, alpha, c):
        """(u, log s^2, Ihat^2 / (sigma^2 + c Ihat^2)) at alpha = a^2, c = b^2 per group."""
        grp = self.error_model.group
        plug_sq = self.plug_intensity * self.plug_intensity
        t2 = self.table.variance + c[grp] * plug_sq
        s_sq = alpha[grp] * t2
        return self.student_w / s_sq, np.log(s_sq), plug_sq / t2

    def error_model_objective(self, g, alpha, c):
        """(phi, d phi/d alpha, d phi/d c): phi = -2 log p(I | theta, a, b) less constants,
        with g, Sigma(d), Ihat and the Student-t weights fixed."""
        t = self.table
        u, log_s_sq, c_factor = self._error_model_terms(alpha, c)
        k = self.error_model.n_groups
        intensity, em_group = t.intensity, self.error_model.group
        order = self._em_order
        if order is not None:
            intensity, em_group, u, g = intensity[order], em_group[order], u[order], g[order]
            log_s_sq, c_factor = log_s_sq[order], c_factor[order]
        parent = self._em_parent
        centric = np.ascontiguousarray(self.centric[parent])
        mean_prior = np.ascontiguousarray(self.mean_prior[parent])

        def evaluate(chunks):
            phi_partial = np.zeros(chunks.size - 1)
            grad_partial = np.zeros((chunks.size - 1, 2 * k))
            error_model_gradient_kernel(intensity, u, g, log_s_sq, c_factor, em_group, k,
                                        self._em_group_start, self.error_model_groups_used,
                                        centric, mean_prior, self.nodes, self.weights, chunks,
                                        phi_partial, grad_partial)
            return [phi_partial, grad_partial]

        phi, sums = self._group_sum(self._em_group_start, evaluate, 2 * k, parent)
        return float(phi), sums[:k] / alpha, sums[k:]

    def error_model_value_and_gradient(self, g, a, b):
        """(phi, d phi/d a, d phi/d b) per error-model group."""
        phi, d_alpha, d_c = self.error_model_objective(g, a * a, b * b)
        return phi, 2.0 * a * d_alpha, 2.0 * b * d_c

    def fit_error_model(self, g):
        """(a, b) maximising the marginal likelihood at fixed theta, Sigma(d) and Ihat:
        L-BFGS-B in (a^2, b^2), each variable scaled by the square root of its Fisher
        information at the start, 1/2 sum (d log s^2/d variable)^2, so that the problem
        is well conditioned whatever the intensities."""
        from scipy.optimize import minimize

        em = self.error_model
        k = em.n_groups
        start = np.concatenate([em.a * em.a, em.b * em.b])
        free = np.concatenate([np.full(k, not em.fix_a), np.full(k, not em.fix_b)])
        _, _, c_factor = self._error_model_terms(start[:k], start[k:])
        used = np.repeat(self.error_model_groups_used, np.diff(self._em_group_start))
        sub_group = em.group if self._em_order is None else em.group[self._em_order]
        if self._em_order is not None:
            c_factor = c_factor[self._em_order]
        # sums over all ranks' observations (a rank-local job), in observation order
        count = rank_local.totals(np.bincount(sub_group[used], minlength=k)).astype(np.float64)
        info = np.concatenate([0.5 * count / start[:k] ** 2,
                               0.5 * self._ordered_bincount(sub_group, used * c_factor
                                                            * c_factor, k)])
        scale = np.sqrt(np.where(info > 0, info, 1.0))
        upper = np.concatenate([np.full(k, np.inf), np.full(k, MAX_B * MAX_B)])
        lower = np.concatenate([np.full(k, 1e-8), np.zeros(k)])

        def unpack(z):
            p = start.copy()
            p[free] = z / scale[free]
            return p

        def fun(z):
            p = unpack(z)
            phi, d_alpha, d_c = self.error_model_objective(g, p[:k], p[k:])
            return phi, np.concatenate([d_alpha, d_c])[free] / scale[free]

        z0 = (start * scale)[free]
        bounds = list(zip((lower * scale)[free], (upper * scale)[free]))
        result = minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 200, "ftol": 1e-13, "gtol": 1e-7})
        p = unpack(result.x)
        em.a = np.sqrt(p[:k])
        em.b = np.sqrt(p[k:])
        self._apply_error_model()

    def _apply_error_model(self):
        em = self.error_model
        u, _, _ = self._error_model_terms(em.a * em.a, em.b * em.b)
        self.u0 = u / self.student_w
        self.u = u

    def fitted_error_models(self):
        """One BasicErrorModel per dataset (position in the manager's models), or None."""
        from .error_model import BasicErrorModel

        if self.error_model is None:
            return None
        models = [None] * len(self.manager.models)
        for k, members in enumerate(self.error_model.groups):
            for d in members:
                models[d] = BasicErrorModel(float(self.error_model.a[k]),
                                            float(self.error_model.b[k]))
        return models

    def _bin_means(self, values):
        count = rank_local.totals(np.bincount(self.bins, minlength=self.n_bins))
        return self._ordered_bincount(self.bins, values, self.n_bins) / np.maximum(count, 1)

    # -- sums over all groups (issue 11: over all ranks of a rank-local job) -------------
    @staticmethod
    def _ordered_bincount(index, values, n):
        """np.bincount(index, values, minlength=n) with the bits of one sequential pass
        over all ranks' terms in rank order (np.bincount's own order in one process)."""
        index = np.asarray(index, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        return rank_local.sequential_over_ranks(
            np.zeros(n), lambda acc: np.add.at(acc, index, values))

    def _table_blocks(self, n_partial, parent=None):
        """(block bounds, rank block offsets or None) over the table's groups: the job's
        read-time key blocks (ScalingTarget.key_blocks) or, outside a job, blocks cut from
        the table's group sizes. parent: the table group of each group summed (the error
        model's (group, hand) groups), whose blocks are then their table groups' blocks."""
        if self.key_blocks is not None:
            bounds, rank_blocks = self.key_blocks
        else:
            bounds, rank_blocks = fixed_block_bounds(self.table.group_start, n_partial), None
        if parent is not None:
            bounds = np.searchsorted(parent, bounds, side="left").astype(np.int64)
        return bounds, rank_blocks

    def _group_sum(self, group_start, evaluate, n_partial, parent=None):
        """Totals over the groups of group_start by the table's blocks (_table_blocks): the
        same bits for any nproc and any number of MPI ranks (backends/block_sums.py)."""
        return key_block_sum(group_start, evaluate, 1 + n_partial, self.nproc,
                             self._table_blocks(n_partial, parent), n_partial)

    def _observation_sum(self, values):
        """The sum of a per-observation array over all observations (all ranks)."""
        t = self.table
        values = np.ascontiguousarray(values, dtype=np.float64)

        def evaluate(chunks):
            out = np.zeros(chunks.size - 1)
            block_observation_sums(values, t.group_start, chunks, out)
            return [out]

        return float(self._group_sum(t.group_start, evaluate, 0)[0])

    # -- M-step target -------------------------------------------------------------------
    def _ell(self, x):
        """g and its derivatives at x, kept for the next call at the same x: an E-step, its
        RMSD offset, the minimiser's first value and LevMar's normal equations after the
        accepted step's value all ask at one x, and evaluating the models with derivatives
        is most of a likelihood run's time (the least-squares target's fused physical pass
        computes no such table)."""
        x = np.asarray(x, dtype=np.float64)
        cached = getattr(self, "_ell_cache", None)
        if cached is not None and np.array_equal(cached[0], x):
            if self.family is None:
                self.manager.set_free(x)  # as an evaluation would leave the models
            return cached[1]
        result = super()._ell(x)
        self._ell_cache = (x.copy(), result)
        return result

    def value_and_gradient(self, x):
        if self.mean_prior is None:
            self.e_step(x)
        g, values, cols = self._ell(x)
        t = self.table
        n_par = self.n_par

        def evaluate(chunks):
            phi_partial = np.zeros(chunks.size - 1)
            grad_partial = np.zeros((chunks.size - 1, n_par))
            likelihood_gradient_kernel(t.intensity, self.u, g, values, cols, t.group_start,
                                       self.centric, self.mean_prior, self.nodes,
                                       self.weights, chunks, phi_partial, grad_partial)
            return [phi_partial, grad_partial]

        phi, grad = self._group_sum(t.group_start, evaluate, n_par)
        phi = float(phi)
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        grad = grad + 2.0 * wr * x
        self.last_phi = phi
        return phi, grad

    def normal_equations(self, x):
        """(phi, b, N) for Levenberg-Marquardt: b = gradient / 2 (exact), N = least squares'
        Gauss-Newton matrix with the weights u (dIh/dp included) + diag(wr).

        N approximates half the Hessian of -2 log L: for a well-measured reflection the
        posterior of J is N(Ih, 1/P) and -2 log L_h is least squares' chi^2_h plus terms
        slowly varying in theta. LevMar's step acceptance uses the exact phi, so N only
        shapes the steps; the covariance is N^-1 (see n_equations)."""
        if self.mean_prior is None:
            self.e_step(x)
        phi, grad = self.value_and_gradient(x)
        g, values, cols = self._ell(x)
        t = self.table
        _, _, normal = least_squares_normal_equations(t.intensity, self.u, g, values, cols,
                                                      t.group_start, self.n_par, self.nproc,
                                                      key_blocks=self.key_blocks)
        return phi, 0.5 * grad, normal + np.diag(self.restraint_weights)

    @property
    def n_equations(self):
        """n_par + phi: LevMar scales its covariance by phi / (n_equations - n_par), a
        least-squares variance factor; the likelihood's weights are already 1/s^2 of the
        refined error model, so its covariance is the inverse normal matrix unscaled."""
        return self.n_par + (self.last_phi if self.last_phi else 1.0)

    def rmsd(self, phi):
        """The minimisers' stopping rule compares relative changes of this: phi (a sum of
        -2 log L, of either sign and dominated by terms that barely move) shifted so that at
        the last E-step it equals least squares' chi^2 there; RMSD = sqrt(that / n). Changes
        in the fit then move it as they move least squares' RMSD, and the same
        rmsd_tolerance stops both at a similar precision."""
        offset = self.rmsd_offset or 0.0
        return float(np.sqrt(max(phi - offset, 0.0) / max(self.n_obs, 1)))


def minimise_with_e_steps(minimiser, target, x0, max_iterations=None, rmsd_tolerance=1e-4,
                          **kwargs):
    """minimiser(target, x0, ...) for least squares; for a LikelihoodTarget, rounds of
    (E-step, minimiser) until a round changes the RMSD by less than rmsd_tolerance
    (relative) or E_STEP_ROUNDS are done.

    Each round asks for LIKELIHOOD_SMALL_STEPS small steps in a row before it stops: a
    fresh E-step changes the problem a little, and one small first step is not convergence
    (stopping there left the strong-rotation merged-I error 8% above least squares')."""
    if not isinstance(target, LikelihoodTarget):
        return minimiser(target, x0, max_iterations, rmsd_tolerance, **kwargs)
    if "small_steps_to_stop" in kwargs:
        kwargs["small_steps_to_stop"] = max(kwargs["small_steps_to_stop"],
                                            LIKELIHOOD_SMALL_STEPS)
    x = np.asarray(x0, dtype=float)
    total_iterations = 0
    history = []
    result = None
    for _ in range(E_STEP_ROUNDS):
        target.e_step(x)
        result = minimiser(target, x, max_iterations, rmsd_tolerance, **kwargs)
        total_iterations += result.n_iterations
        history.extend(result.rmsd_history)
        x = result.x
        start = result.rmsd_history[0] if result.rmsd_history else result.rmsd
        if start > 0 and abs(start - result.rmsd) / start < rmsd_tolerance:
            break
    result.n_iterations = total_iterations
    result.rmsd_history = history
    return result


def make_target(params, manager, ih_table, nproc, space_group, unit_cell, error_models=None,
                hand=None, fit_error_model=True):
    """The scaling target scaling_options.target names (least squares by default).

    error_models: the current BasicErrorModel (or None) of each dataset; the likelihood
    target then fits a and b (per weighting.error_model.grouping) inside the likelihood."""
    from ..model.base import param

    if param(params, "scaling_options.target", "least_squares") != "likelihood":
        return ScalingTarget(manager, ih_table, nproc)
    fit = None if error_models is None else error_model_fit(params, ih_table, error_models,
                                                            hand)
    return LikelihoodTarget(manager, ih_table, nproc, space_group, unit_cell,
                            param(params, "scaling_options.likelihood.student_t_dof"),
                            param(params, "scaling_options.likelihood.n_resolution_bins",
                                  DEFAULT_RESOLUTION_BINS), error_model=fit,
                            fit_error_model=fit_error_model)

