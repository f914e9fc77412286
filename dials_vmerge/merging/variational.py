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

import numpy as np

from ..kernels.merging import (  # noqa: F401  (the CPU kernels, cctbx-free)
    CONTINUED_FRACTION_DEPTH, GL_NODES, GL_WEIGHTS, INV_SQRT_2PI, SQRT_HALF,
    posterior_from_sufficient, posterior_kernel, standard_posterior_quadrature,
    truncated_normal_standard_moments)
from .groups import GroupedObservations
from .merged import MergedIntensities

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
    return bin_means(mean_j / epsilon, bin_of, n_bins)


def bin_means(values, bin_of, n_bins):
    """Mean of `values` per bin (0 for an empty bin): sums in the order of `values`."""
    sums = np.bincount(bin_of, weights=values, minlength=n_bins)
    counts = np.bincount(bin_of, minlength=n_bins)
    return sums / np.maximum(counts, 1)


class WilsonPrior:
    """The steps of the Sigma(d) fit that read every group: the resolution bins (an order
    statistic of 1/d^2), the per-bin means of E[J]/eps and the floor (a mean over groups).
    This is the one-process version over the groups merged; merging/rank_variational.py's
    RankWilsonPrior takes the same steps over all MPI ranks' groups (each rank merging its
    own), with the same bits."""

    def bins(self, groups, n_bins):
        """(bin of each group, number of bins used)."""
        bin_of = resolution_bins(groups.dstar_sq, n_bins)
        return bin_of, int(bin_of.max()) + 1 if len(bin_of) else 0

    def start(self, values, bin_of, n_used_bins):
        """(per-bin means of `values` (per-group classical E[J]/eps), the positive floor)."""
        return bin_means(values, bin_of, n_used_bins), _positive_floor(values)

    def update(self, values, bin_of, n_used_bins):
        """Per-bin means of `values` (per-group E[J]/eps)."""
        return bin_means(values, bin_of, n_used_bins)


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
    prior: WilsonPrior = None,
) -> MergedIntensities:
    """Posterior mean/SD of J and F for every group.

    `wilson_sigma_per_group` fixes Sigma (e.g. from the full data when merging half
    datasets); otherwise Sigma(d) is estimated by EM in `n_bins` resolution bins, its steps
    over all groups taken by `prior` (WilsonPrior: these groups; under MPI the ranks' groups
    together, rank_variational.RankWilsonPrior, every rank calling with its own groups)."""
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

        from ..backends.cuda_job_table import merging_columns

        # the job's resident I and sigma (uploaded once per job), gathered on the device
        i_device, s_device, gs_device = merging_columns(groups, intensity, sigma)
        device = DeviceVariationalPosterior(i_device, s_device, gs_device, centric,
                                            GL_NODES, GL_WEIGHTS)

        def e_step(prior_mean, want_amplitude):  # noqa: F811 (the device twin)
            return device.e_step(prior_mean, t_dof, max_t_iterations, want_amplitude)

    extra = {}
    if wilson_sigma_per_group is None:
        prior = WilsonPrior() if prior is None else prior
        bin_of, n_used_bins = prior.bins(groups, n_bins)
        # Start from the inverse-variance means, floored so the prior is proper.
        precision = np.add.reduceat(1.0 / s_sorted**2, groups.group_start[:-1]) if len(
            s_sorted) else np.zeros(0)
        weighted = np.add.reduceat(i_sorted / s_sorted**2, groups.group_start[:-1]) if len(
            s_sorted) else np.zeros(0)
        classical = weighted / precision
        wilson_sigma, floor = prior.start(classical / epsilon, bin_of, n_used_bins)
        wilson_sigma = np.maximum(wilson_sigma, floor)
        iterations = 0
        for iterations in range(1, max_em_iterations + 1):
            mean_j, _, _, _ = e_step(epsilon * wilson_sigma[bin_of], False)
            updated = np.maximum(prior.update(mean_j / epsilon, bin_of, n_used_bins),
                                 floor * 1e-6)
            # the same per-bin arrays on every rank (RankWilsonPrior): the same decision
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
