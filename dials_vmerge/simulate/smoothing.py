"""Gaussian smoothers in the DIALS form (dials-scaling.md 4.2, 4.3), for the true scale model.

The simulator's own small implementation: the true physical and array models are written so
that a DIALS-style model with the same layout represents them exactly. Coordinates are in
units of the parameter spacing (x = z * norm_fac), starting at 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def smooth_layout(osc_range_deg: float, osc_width_deg: float, interval_deg: float):
    """(n_param, norm_fac, spacing_deg) as DIALS initialise_smooth_input (4.3)."""
    interval = interval_deg + 1e-5
    if osc_range_deg <= interval:
        n_param, spacing = 2, osc_range_deg
    elif osc_range_deg < 2 * interval:
        n_param, spacing = 3, osc_range_deg / 2.0
    else:
        n_bins = max(int(osc_range_deg / interval) + 1, 3)
        spacing = osc_range_deg / n_bins
        n_param = n_bins + 2
    return n_param, 0.999 * osc_width_deg / spacing, spacing


def auto_physical_intervals(osc_range_deg: float):
    """(scale_interval, decay_interval) DIALS picks for a physical model (4.3 table)."""
    for limit, scale, decay in ((5, 1.0, 1.5), (10, 2.0, 3.0), (25, 4.0, 5.0), (90, 8.0, 10.0)):
        if osc_range_deg < limit:
            return scale, decay
    return 15.0, 20.0


def n_param_from_bins(n_bins: int) -> int:
    return {1: 2, 2: 3}.get(n_bins, n_bins + 2)


@njit(cache=True)
def _iround(v):
    """Round half away from zero (Boost iround)."""
    if v >= 0:
        return int(np.floor(v + 0.5))
    return int(np.ceil(v - 0.5))


@njit(cache=True)
def smoother_window(x, n_param, out_index, out_weight):
    """Fill up to three contributing parameter indices and unnormalised weights for x.

    Returns the number of contributing parameters and the smoother sigma used.
    """
    n_avg = min(3, n_param)
    sigma = 0.65 + 0.05 * (n_avg - 2)
    if n_param <= 3:
        i1, i2 = 0, n_param
        offset = 0.0
    else:
        i1 = _iround(x - n_avg / 2.0) + 1
        i2 = i1 + n_avg
        if i1 < 0:
            i1 = 0
            i2 = max(2, i2)
        if i2 > n_param:
            i2 = n_param
            i1 = min(i1, n_param - 2)
        offset = 0.5
    m = 0
    for i in range(i1, i2):
        position = i - offset
        t = (x - position) / sigma
        out_index[m] = i
        out_weight[m] = np.exp(-t * t)
        m += 1
    return m


@njit(parallel=True, cache=True)
def smooth_1d(x, params):
    n = x.shape[0]
    out = np.empty(n)
    n_param = params.shape[0]
    for i in prange(n):
        idx = np.empty(3, dtype=np.int64)
        w = np.empty(3)
        m = smoother_window(x[i], n_param, idx, w)
        num = 0.0
        den = 0.0
        for a in range(m):
            num += w[a] * params[idx[a]]
            den += w[a]
        out[i] = num / den
    return out


@njit(parallel=True, cache=True)
def smooth_2d(x, y, params):
    """params[i, j]: i along x, j along y (stored x fastest in DIALS JSON)."""
    n = x.shape[0]
    out = np.empty(n)
    for r in prange(n):
        ix = np.empty(3, dtype=np.int64)
        wx = np.empty(3)
        iy = np.empty(3, dtype=np.int64)
        wy = np.empty(3)
        mx = smoother_window(x[r], params.shape[0], ix, wx)
        my = smoother_window(y[r], params.shape[1], iy, wy)
        num = 0.0
        den = 0.0
        for a in range(mx):
            for b in range(my):
                w = wx[a] * wy[b]
                num += w * params[ix[a], iy[b]]
                den += w
        out[r] = num / den
    return out


@njit(parallel=True, cache=True)
def smooth_3d(x, y, z, params):
    n = x.shape[0]
    out = np.empty(n)
    for r in prange(n):
        ix = np.empty(3, dtype=np.int64)
        wx = np.empty(3)
        iy = np.empty(3, dtype=np.int64)
        wy = np.empty(3)
        iz = np.empty(3, dtype=np.int64)
        wz = np.empty(3)
        mx = smoother_window(x[r], params.shape[0], ix, wx)
        my = smoother_window(y[r], params.shape[1], iy, wy)
        mz = smoother_window(z[r], params.shape[2], iz, wz)
        num = 0.0
        den = 0.0
        for a in range(mx):
            for b in range(my):
                for c in range(mz):
                    w = wx[a] * wy[b] * wz[c]
                    num += w * params[ix[a], iy[b], iz[c]]
                    den += w
        out[r] = num / den
    return out
