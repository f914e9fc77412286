"""Merged intensities against the simulator's truth (tests and benchmarks/accuracy.py).

Scaling determines intensities only up to an overall K exp(-B d*^2 / 2) (the target sees g
only through I/g - Ih), so every comparison first fits that pair:

    I_merged ~ K exp(-B d*^2 / 2) I_true,

by weighted least squares on the merged sigmas (Gauss-Newton from a log-linear start). The
figures are then
  - relative_error: sqrt(sum (I_m / f - I_t)^2 / sum I_t^2), f = K exp(-B d*^2/2), i.e. on
    the truth's scale (invariant to the K, B the merged data happen to have);
  - calibration_sd: SD of (I_m - f I_t) / SIGI_m (1 when the merged sigmas are right);
  - cc_anom: correlation of merged I(+) - I(-) with the true differences (anomalous truth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAUSS_NEWTON_ITERATIONS = 20


def _keys(index):
    index = np.asarray(index, dtype=np.int64) + 2048
    return (index[:, 0] * 4096 + index[:, 1]) * 4096 + index[:, 2]


def match(index_a, index_b):
    """Positions (ia, ib) of the Miller indices common to two arrays."""
    _, ia, ib = np.intersect1d(_keys(index_a), _keys(index_b), return_indices=True)
    return ia, ib


@dataclass
class TruthComparison:
    k: float
    b: float  # A^2, I_m ~ K exp(-B d*^2 / 2) I_true
    relative_error: float
    calibration_sd: float
    n: int

    def as_dict(self):
        return {"K": self.k, "B": self.b, "relative_error": self.relative_error,
                "calibration_sd": self.calibration_sd, "n": self.n}


def fit_overall_k_b(merged, sigma, true, dstar_sq):
    """(K, B) of I_m ~ K exp(-B d*^2/2) I_true, least squares weighted by 1/sigma^2."""
    strong = true > 0
    ratio_ok = strong & (merged > 0)
    design = np.column_stack([np.ones(ratio_ok.sum()), -0.5 * dstar_sq[ratio_ok]])
    # log-linear start, weighted by (I_true/sigma)^2 (the log ratio's inverse variance)
    w = (true[ratio_ok] / sigma[ratio_ok]) ** 2
    coef = np.linalg.lstsq(design * np.sqrt(w)[:, None],
                           np.log(merged[ratio_ok] / true[ratio_ok]) * np.sqrt(w), rcond=None)[0]
    log_k, b = coef
    x = -0.5 * dstar_sq
    for _ in range(GAUSS_NEWTON_ITERATIONS):
        model = np.exp(log_k + b * x) * true
        residual = (merged - model) / sigma
        jacobian = np.column_stack([model, model * x]) / sigma[:, None]
        step = np.linalg.lstsq(jacobian, residual, rcond=None)[0]
        log_k, b = log_k + step[0], b + step[1]
        if np.all(np.abs(step) < 1e-10):
            break
    return float(np.exp(log_k)), float(b)


def compare_with_truth(index, intensity, sigma, dstar_sq, true_index, true_intensity,
                       k_b=None):
    """TruthComparison of merged (index, I, SIGI, d*^2) with the true intensities.

    k_b: a (K, B) to use instead of fitting one (e.g. the one fitted on I(+)/I(-) together).
    """
    ia, ib = match(index, true_index)
    i_m, s_m, d2 = intensity[ia], sigma[ia], dstar_sq[ia]
    i_t = true_intensity[ib]
    ok = (s_m > 0) & np.isfinite(i_m)
    i_m, s_m, d2, i_t = i_m[ok], s_m[ok], d2[ok], i_t[ok]
    k, b = fit_overall_k_b(i_m, s_m, i_t, d2) if k_b is None else k_b
    factor = k * np.exp(-0.5 * b * d2)
    # on the truth's scale: a ratio on the merged scale would change with B alone (a larger
    # B shrinks the noisy high-resolution terms relative to the precise low-resolution ones)
    relative = float(np.sqrt(np.sum((i_m / factor - i_t) ** 2) / np.sum(i_t ** 2)))
    deviation = (i_m - factor * i_t) / s_m
    return TruthComparison(k, b, relative, float(np.std(deviation)), int(i_m.size))


def cc_anomalous(index_anom, intensity_anom, true_index_anom, true_intensity_anom):
    """Correlation of merged I(+) - I(-) with the true differences (pairs present in both).

    The index arrays hold anomalous ASU indices (h and -h distinct); a pair is (h, -h)."""
    keys = _keys(index_anom)
    mates = _keys(-np.asarray(index_anom, dtype=np.int64))
    pos = {int(k): i for i, k in enumerate(keys)}
    plus, minus = [], []
    for i, m in enumerate(mates):
        j = pos.get(int(m))
        if j is not None and i < j:
            plus.append(i)
            minus.append(j)
    plus, minus = np.array(plus, dtype=np.int64), np.array(minus, dtype=np.int64)
    true_keys = {int(k): i for i, k in enumerate(_keys(true_index_anom))}
    diff_m, diff_t = [], []
    for p, m in zip(plus, minus):
        tp = true_keys.get(int(keys[p]))
        tm = true_keys.get(int(keys[m]))
        if tp is None or tm is None:
            continue
        diff_m.append(intensity_anom[p] - intensity_anom[m])
        diff_t.append(true_intensity_anom[tp] - true_intensity_anom[tm])
    if len(diff_m) < 3:
        return float("nan")
    return float(np.corrcoef(diff_m, diff_t)[0, 1])
