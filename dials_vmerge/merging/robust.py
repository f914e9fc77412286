"""Student-t maximum-likelihood merging per unique reflection.

Model: I_i ~ t_nu(loc = mu, scale = sigma_i) with the reported sigma as the scale (the
reciprocalspaceship notebook's convention; not variance-matched). The estimate starts at the
inverse-variance mean and is refined by iteratively reweighted least squares, weights
w_i = (nu + 1) / (nu + r_i^2), r_i = (I_i - mu) / sigma_i, which increases the likelihood
at every step and converges to a local maximum.

Sigma of mu is 1/sqrt of the observed information
    sum_i (nu + 1) (nu - r_i^2) / (sigma_i^2 (nu + r_i^2)^2).
Where that is not clearly positive (an outlier-dominated group where the t-likelihood is not
locally convex) we fall back to the expected (Fisher) information
sum_i (nu + 1) / ((nu + 3) sigma_i^2), which is always positive.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .groups import GroupedObservations
from .merged import MergedIntensities

MAX_ITERATIONS = 200
# With one or two observations no majority can say which one is the outlier, and the
# two-point t-likelihood turns bimodal (its maximum jumps to the more precise point), so
# such groups keep the inverse-variance mean; sigma still comes from the t information.
MIN_OBSERVATIONS_FOR_REWEIGHTING = 3
RELATIVE_TOLERANCE = 1e-10


@njit(cache=True, parallel=True)
def student_t_merge_kernel(
    intensity, sigma, group_start, dof, max_iterations, tolerance, min_observations
):
    n_groups = group_start.shape[0] - 1
    mean = np.zeros(n_groups)
    merged_sigma = np.zeros(n_groups)
    used_fallback = np.zeros(n_groups, dtype=np.bool_)
    for g in prange(n_groups):
        start = group_start[g]
        end = group_start[g + 1]
        sum_w = 0.0
        sum_wi = 0.0
        for i in range(start, end):
            if sigma[i] > 0.0:
                w = 1.0 / (sigma[i] * sigma[i])
                sum_w += w
                sum_wi += w * intensity[i]
        if sum_w == 0.0:
            continue
        mu = sum_wi / sum_w
        n_usable = 0
        for i in range(start, end):
            if sigma[i] > 0.0:
                n_usable += 1
        for _ in range(max_iterations if n_usable >= min_observations else 0):
            sum_w = 0.0
            sum_wi = 0.0
            for i in range(start, end):
                if sigma[i] > 0.0:
                    r = (intensity[i] - mu) / sigma[i]
                    w = (dof + 1.0) / (dof + r * r) / (sigma[i] * sigma[i])
                    sum_w += w
                    sum_wi += w * intensity[i]
            new_mu = sum_wi / sum_w
            step = abs(new_mu - mu)
            mu = new_mu
            if step <= tolerance * (abs(mu) + 1.0 / np.sqrt(sum_w)):
                break
        observed = 0.0
        expected = 0.0
        for i in range(start, end):
            if sigma[i] > 0.0:
                s2 = sigma[i] * sigma[i]
                r2 = (intensity[i] - mu) ** 2 / s2
                observed += (dof + 1.0) * (dof - r2) / (s2 * (dof + r2) ** 2)
                expected += (dof + 1.0) / ((dof + 3.0) * s2)
        mean[g] = mu
        # "Clearly positive": at least a tenth of the expected information, else the
        # curvature is too flat or negative to give a usable sigma.
        if observed > 0.1 * expected:
            merged_sigma[g] = 1.0 / np.sqrt(observed)
        else:
            merged_sigma[g] = 1.0 / np.sqrt(expected)
            used_fallback[g] = True
    return mean, merged_sigma, used_fallback


def merge_robust(groups: GroupedObservations, intensity, sigma, dof: float = 4.0):
    if not dof > 0:
        raise ValueError("robust.dof must be positive")
    i_sorted = groups.gather(np.asarray(intensity, dtype=np.float64))
    s_sorted = groups.gather(np.asarray(sigma, dtype=np.float64))
    mean, merged_sigma, fallback = student_t_merge_kernel(
        i_sorted, s_sorted, groups.group_start, float(dof), MAX_ITERATIONS, RELATIVE_TOLERANCE,
        MIN_OBSERVATIONS_FOR_REWEIGHTING,
    )
    return MergedIntensities.from_groups(
        groups, mean, merged_sigma, "robust", extra={"sigma_fallback": fallback}
    )
