"""var(g_i) = sum_kk' dg_i/dp_k cov[k, k'] dg_i/dp_k' of one row of an ELL derivative table:
the one formula behind scaling.target.variance_of_g_kernel (any model family's table) and the
smooth-rotation family's fused expansion (kernels/physical_family.py), which computes each
row's derivatives into a scratch row instead of a table of all rows."""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def variance_of_g_row(deriv_values, deriv_col, i, covariance):
    """var(g) of row i over the free parameters (deriv_col -1: no free column)."""
    n_slots = deriv_values.shape[1]
    # the covariance is symmetric: diagonal terms once, each off-diagonal pair twice
    diagonal = 0.0
    off_diagonal = 0.0
    for k in range(n_slots):
        ck = deriv_col[i, k]
        if ck < 0:
            continue
        dk = deriv_values[i, k]
        diagonal += dk * covariance[ck, ck] * dk
        for kk in range(k + 1, n_slots):
            ckk = deriv_col[i, kk]
            if ckk >= 0:
                off_diagonal += dk * covariance[ck, ckk] * deriv_values[i, kk]
    return diagonal + 2.0 * off_diagonal
