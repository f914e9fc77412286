"""The prepared GPU check: every CUDA kernel of the flat engine against its CPU twin, and each
kernel's time against the device bandwidth bound, on synthetic flat layouts.

Runs with numpy and numba (numba-cuda) alone: no cctbx. From the repository root:

    python benchmarks/gpu_check.py                      # 1e6, 1e7, 1e8 observations
    python benchmarks/gpu_check.py --out gpu_check.json
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --sizes 1e3 --check-size 1e3

Layouts (numpy, fixed seed): "kb" - KB stills, ~250 observations per still, one scale and one
B per still; "physical" - 4 sweeps with 3-parameter smoother runs for scale and decay and 8
spherical-harmonic absorption coefficients per observation; "array" - 4 sweeps of the array
model, a 3x3 neighbourhood of a 2D decay grid and a 3x3x3 one of a 3D absorption grid per
observation; "mixed" - half KB stills and half physical sweeps with absorption, rows
interleaved (a job of two model families: each family's kernel on its rows, scattered into
one table; the rows split by family on the device). Observations are sorted by group (mean
multiplicity 8), as in the scaling engine. The array layout (36 ELL slots, ~1 kB per
observation on the device) is timed up to --array-max observations; the normal equations of
the full-matrix round (dense n_par^2 partials per segment) on the physical and array
layouts up to --normal-max.

Agreement (check size, default 1e6): each device kernel against its CPU twin, max relative
difference (gradients relative to the largest gradient component); must be <= 1e-10.

Timing: median of --repeats launches after a warm-up, device synchronised. The bandwidth
bound of a pass is (bytes read + bytes written by the pass) / (device-to-device copy rate),
where the copy rate is measured here as 2 x bytes / time of a device-to-device copy of a
1 GiB array (a copy reads and writes every byte). "evaluation" is one target + gradient
evaluation of the minimiser (model kernel, residual kernel, gradient kernel, the host's
ordered sums and the copies of Phi and the gradient back), the device part of one LBFGS
iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dials_vmerge  # noqa: E402,F401  (threading layer; cctbx optional)
import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from dials_vmerge.backends.cuda_target import (THREADS_PER_BLOCK,  # noqa: E402
                                               merged_means_kernel, segment_bounds)
from dials_vmerge.kernels.cuda import array as da  # noqa: E402
from dials_vmerge.kernels.cuda import merging as dmg  # noqa: E402
from dials_vmerge.kernels.cuda.launch import blocks as launch_blocks  # noqa: E402
from dials_vmerge.kernels.cuda import models as dm  # noqa: E402
from dials_vmerge.kernels.cuda import outliers as do  # noqa: E402
from dials_vmerge.kernels.cuda.normal import DeviceNormalEquations  # noqa: E402
from dials_vmerge.kernels.cuda.target import DeviceTarget  # noqa: E402
from dials_vmerge.kernels.cuda import variational as dv  # noqa: E402
from dials_vmerge.kernels.cuda.error_model import DeviceErrorModelSums  # noqa: E402
from dials_vmerge.kernels.cuda import gather as dg  # noqa: E402
from dials_vmerge.kernels.cuda import resident_rows as drr  # noqa: E402
from dials_vmerge.kernels.cuda.streamed import HostStreamedTarget  # noqa: E402
from dials_vmerge.kernels.cuda.streamed_normal import StreamedNormalEquations  # noqa: E402

MEAN_MULTIPLICITY = 8
OBS_PER_STILL = 250
N_SWEEPS = 4
N_ABSORPTION = 8
TOLERANCE = 1e-10
MAX_DENSE_COVARIANCE = 8192
# The normal equations are compared with the CPU kernel on a layout of at most this size:
# the work per observation grows as (columns per group)^2, ~100^2 (physical) and ~300^2
# (array) in these layouts, on the CPU as on the device.
NORMAL_CHECK_MAX = {"physical": 1_000_000, "array": 100_000}
NORMAL_LAYOUTS = ["physical", "array"]
# The error-model passes are evaluated at these a and b; the streamed target in this many
# batches (tiny compared with the layout: the overlap of copies and kernels on two streams)
EM_A, EM_B = 1.1, 0.03
STREAMED_BATCHES = 8
# share of the job rows a round's minimisation table keeps (subset_table's timing)
RESIDENT_KEEP = 0.3
# robust merging at the run's defaults nu = 4, c = 1.5: (nu + 1) A / B and A / B^2 of
# merging/robust.py's gaussian_calibration (scipy quadrature; its values, to 5 digits)
ROBUST_INFO_TO_VARIANCE, ROBUST_GAUSSIAN_FACTOR = 0.44361, 1.02892
GL_NODES_8, GL_WEIGHTS_8 = np.polynomial.legendre.leggauss(8)


def _blocks(n):
    return launch_blocks(n)


def group_offsets(rng, n):
    sizes = rng.integers(1, 2 * MEAN_MULTIPLICITY, n // MEAN_MULTIPLICITY + 16)
    start = np.concatenate([[0], np.cumsum(sizes)])
    start = start[start < n]
    return np.append(start, n).astype(np.int64)


def kb_layout(n, seed=1):
    rng = np.random.default_rng(seed)
    n_datasets = max(2, n // OBS_PER_STILL)
    lay = {
        "kind": "kb",
        "n": n,
        "n_datasets": n_datasets,
        "row_dataset": rng.integers(0, n_datasets, n),
        "inv_two_d_sq": rng.uniform(0.005, 0.25, n),
        "intensity": rng.exponential(500.0, n),
        "weight": rng.uniform(0.001, 0.01, n),
        "group_start": group_offsets(rng, n),
        "scale_value": rng.uniform(0.5, 2.0, n_datasets),
        "decay_value": rng.uniform(-2.0, 1.0, n_datasets),
        "scale_col": (2 * np.arange(n_datasets)).astype(np.int32),
        "decay_col": (2 * np.arange(n_datasets) + 1).astype(np.int32),
    }
    lay["scale_col"][0] = -1  # the first still's scale fixed, as in a scaling job
    lay["n_params"] = 2 * n_datasets
    lay["cols"] = dm.kb_family_columns(lay["row_dataset"], lay["scale_col"], lay["decay_col"])
    return lay


def physical_layout(n, seed=2):
    rng = np.random.default_rng(seed)
    n_scale, n_decay, n_abs = 24, 12, N_ABSORPTION
    per_sweep = n_scale + n_decay + n_abs
    n_full = N_SWEEPS * per_sweep
    sweep = rng.integers(0, N_SWEEPS, n)
    record = np.empty((n, 8))
    record[:, 0] = rng.exponential(500.0, n)
    record[:, 1] = rng.uniform(0.001, 0.01, n)
    for lo, width in ((2, 3), (5, 3)):
        weights = rng.uniform(0.0, 1.0, (n, width))
        weights /= weights.sum(axis=1)[:, None]
        record[:, lo:lo + width] = weights
    record[:, 5:8] *= rng.uniform(0.005, 0.25, n)[:, None]  # decay weights / 2d^2
    first = np.empty((n, 2), dtype=np.int32)
    first[:, 0] = sweep * per_sweep + rng.integers(0, n_scale - 2, n)
    first[:, 1] = sweep * per_sweep + n_scale + rng.integers(0, n_decay - 2, n)
    parameters = np.concatenate([
        np.concatenate([rng.uniform(0.8, 1.2, n_scale), rng.uniform(-0.5, 0.5, n_decay),
                        rng.normal(0.0, 0.02, n_abs)]) for _ in range(N_SWEEPS)]
        + [np.array([0.0, 0.0, 1.0, 0.0, 0.0])])
    return {
        "kind": "physical",
        "n": n,
        "record": record,
        "first_param": first,
        "absorption_coefficients": rng.uniform(-1.0, 1.0, (n, n_abs)),
        "absorption_first": (sweep * per_sweep + n_scale + n_decay).astype(np.int32),
        "parameters": parameters,
        "n_full": n_full,
        "n_params": n_full + 5,
        "intensity": np.ascontiguousarray(record[:, 0]),
        "weight": np.ascontiguousarray(record[:, 1]),
        "group_start": group_offsets(rng, n),
        "cols": dm.physical_columns(first, (sweep * per_sweep + n_scale + n_decay), n_abs),
    }


ARRAY_DECAY_GRID = (10, 10)  # resolution x time
ARRAY_ABSORPTION_GRID = (4, 4, 10)  # x, y, time


def array_layout(n, seed=4):
    """Array-model layout: per observation 9 decay and 27 absorption smoother weights
    (normalised per component) on a 3x3 (3x3x3) neighbourhood of its sweep's grids."""
    rng = np.random.default_rng(seed)
    n_decay = ARRAY_DECAY_GRID[0] * ARRAY_DECAY_GRID[1]
    nx, ny, nt = ARRAY_ABSORPTION_GRID
    per_sweep = n_decay + nx * ny * nt
    sweep = rng.integers(0, N_SWEEPS, n)
    weights = rng.uniform(0.05, 1.0, (n, 36))
    weights[:, :9] /= weights[:, :9].sum(axis=1)[:, None]
    weights[:, 9:] /= weights[:, 9:].sum(axis=1)[:, None]
    index = np.empty((n, 36), dtype=np.int64)
    n1, n2 = ARRAY_DECAY_GRID
    i0, j0 = rng.integers(0, n1 - 2, n), rng.integers(0, n2 - 2, n)
    base = sweep * per_sweep
    slot = 0
    for b in range(3):
        for a in range(3):
            index[:, slot] = base + (i0 + a) + (j0 + b) * n1
            slot += 1
    x0, y0, t0 = rng.integers(0, nx - 2, n), rng.integers(0, ny - 2, n), rng.integers(0, nt - 2, n)
    for c in range(3):
        for b in range(3):
            for a in range(3):
                index[:, slot] = base + n_decay + (x0 + a) + (y0 + b) * nx + (t0 + c) * nx * ny
                slot += 1
    n_full = N_SWEEPS * per_sweep
    parameters = np.concatenate([rng.uniform(0.8, 1.2, n_full), [1.0]])
    return {
        "kind": "array",
        "n": n,
        "weights": weights,
        "full_index": index,
        "component_start": np.array([0, 9, 36], dtype=np.int64),
        "parameters": parameters,
        "n_full": n_full,
        "n_params": n_full,
        "intensity": rng.exponential(500.0, n),
        "weight": rng.uniform(0.001, 0.01, n),
        "group_start": group_offsets(rng, n),
        "cols": index,
    }


# Layouts above this size are copies of one layout of this size (host generation time of a
# 1e8 physical layout would otherwise dominate the check): KB copies are new stills (their
# own K and B), physical copies add observations to the same sweeps.
BASE_SIZE = 10_000_000


def build_layout(kind, n):
    builder = {"kb": kb_layout, "physical": physical_layout, "array": array_layout}[kind]
    if n <= BASE_SIZE:
        return builder(n)
    copies = -(-n // BASE_SIZE)
    base = builder(-(-n // copies))
    return replicate(base, copies)


def replicate(base, copies):
    nb = base["n"]
    n = nb * copies
    lay = dict(base)
    lay["n"] = n
    for key in ("intensity", "weight", "inv_two_d_sq", "record", "first_param",
                "absorption_coefficients", "absorption_first", "cols", "weights",
                "full_index"):
        if key in base:
            reps = (copies,) + (1,) * (base[key].ndim - 1)
            lay[key] = np.tile(base[key], reps)
    starts = base["group_start"][:-1]
    lay["group_start"] = np.concatenate(
        [starts + k * nb for k in range(copies)] + [np.array([n])]).astype(np.int64)
    if base["kind"] == "kb":
        nd = base["n_datasets"]
        lay["n_datasets"] = nd * copies
        lay["row_dataset"] = np.concatenate([base["row_dataset"] + k * nd
                                             for k in range(copies)])
        lay["scale_value"] = np.tile(base["scale_value"], copies)
        lay["decay_value"] = np.tile(base["decay_value"], copies)
        lay["scale_col"] = (2 * np.arange(nd * copies)).astype(np.int32)
        lay["decay_col"] = (2 * np.arange(nd * copies) + 1).astype(np.int32)
        lay["scale_col"][0] = -1
        lay["n_params"] = 2 * nd * copies
        lay["cols"] = dm.kb_family_columns(lay["row_dataset"], lay["scale_col"],
                                           lay["decay_col"])
    return lay


class DeviceLayout:
    """A layout's arrays on the device, its DeviceTarget and output buffers."""

    def __init__(self, lay, batch_size=None):
        self.lay = lay
        n = lay["n"]
        self.n = n
        self.n_slots = lay["cols"].shape[1]
        if lay["kind"] == "kb":
            self.row_dataset = cuda.to_device(lay["row_dataset"])
            self.inv_two_d_sq = cuda.to_device(lay["inv_two_d_sq"])
            self.scale_value = cuda.to_device(lay["scale_value"])
            self.decay_value = cuda.to_device(lay["decay_value"])
        elif lay["kind"] == "array":
            self.weights = cuda.to_device(lay["weights"])
            self.full_index = cuda.to_device(lay["full_index"])
            self.component_start = cuda.to_device(lay["component_start"])
            self.parameters = cuda.to_device(lay["parameters"])
        else:
            self.record = cuda.to_device(lay["record"])
            self.first_param = cuda.to_device(lay["first_param"])
            self.absorption = cuda.to_device(lay["absorption_coefficients"])
            self.absorption_first = cuda.to_device(lay["absorption_first"])
            self.parameters = cuda.to_device(lay["parameters"])
        self.fixed = cuda.to_device(np.ones(1))
        self.g = cuda.device_array(n)
        self.deriv = cuda.device_array((n, self.n_slots))
        self.cols = cuda.to_device(np.ascontiguousarray(lay["cols"], dtype=np.int64))
        self.target = DeviceTarget(lay["intensity"], lay["weight"], lay["group_start"],
                                   lay["cols"], lay["n_params"], batch_size)
        self.var_g = cuda.device_array(n)
        # var(g) takes a dense covariance of the free parameters: a positive definite
        # low-rank-plus-diagonal one, up to MAX_DENSE_COVARIANCE parameters (else not timed)
        self.covariance_host = None
        n_par = lay["n_params"]
        if n_par <= MAX_DENSE_COVARIANCE:
            rng = np.random.default_rng(3)
            low = rng.normal(size=(n_par, 4))
            self.covariance_host = low @ low.T / 4.0 + np.diag(rng.uniform(0.1, 1.0, n_par))
        self.covariance = (cuda.to_device(self.covariance_host)
                           if self.covariance_host is not None else None)
        self.n_groups = lay["group_start"].size - 1
        self.mean = cuda.device_array(self.n_groups)
        self.sigma = cuda.device_array(self.n_groups)
        self.group_start = cuda.to_device(lay["group_start"])
        self.capped = cuda.device_array(n)
        self.scratch = cuda.device_array(n)
        self.outlier = cuda.device_array(n, np.uint8)
        self.normal = None
        self.sigma_obs = cuda.to_device(1.0 / np.sqrt(lay["weight"]))
        self.abs_dev = cuda.device_array(self.n_groups)
        self.total = cuda.device_array(self.n_groups)

    def merge_classical(self):
        """Classical merge with internal variance (the merging-statistics call)."""
        dmg.inverse_variance_merge_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.sigma_obs, self.group_start, 1e-6, True, self.mean,
            self.sigma)

    def statistics_sums(self):
        dmg.deviation_sums_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.group_start, self.mean, self.abs_dev, self.total)

    def with_normal(self):
        """The normal-equation pass's scratch (physical and array layouts)."""
        if self.normal is None:
            self.normal = DeviceNormalEquations(self.target.intensity, self.target.weight,
                                                self.lay["group_start"], self.group_start,
                                                self.lay["cols"], self.lay["n_params"])
        return self.normal

    def normal_equations(self):
        return self.with_normal().evaluate(self.g, self.deriv)

    def outliers(self):
        """Capped weights and the standard z-test (the mask zeroed first, as a new round)."""
        do.capped_weights_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.weight, self.group_start, self.scratch, self.capped)
        self.outlier.copy_to_device(self.zero_mask())
        do.standard_outlier_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.capped, self.g, self.group_start, 6.0, self.outlier)

    def zero_mask(self):
        if getattr(self, "_zero_mask", None) is None:
            self._zero_mask = cuda.to_device(np.zeros(self.n, np.uint8))
        return self._zero_mask

    def model(self):
        if self.lay["kind"] == "kb":
            dm.kb_family_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.row_dataset, self.inv_two_d_sq, self.fixed, False, self.scale_value,
                self.decay_value, self.g, self.deriv)
        elif self.lay["kind"] == "array":
            da.array_model_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.weights, self.full_index, self.component_start, self.fixed, False,
                self.parameters, self.g, self.deriv)
        else:
            dm.physical_model_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.record, self.first_param, self.absorption, self.absorption_first, True,
                self.fixed, False, self.parameters, self.g, self.deriv)

    def model_g(self):
        if self.lay["kind"] == "kb":
            dm.kb_family_g_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.row_dataset, self.inv_two_d_sq, self.fixed, False, self.scale_value,
                self.decay_value, self.g)
        elif self.lay["kind"] == "array":
            da.array_g_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.weights, self.full_index, self.component_start, self.fixed, False,
                self.parameters, self.g)
        else:
            dm.physical_g_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.record, self.first_param, self.absorption, self.absorption_first, True,
                self.fixed, False, self.parameters, self.g)

    def residuals(self):
        for batch in self.target.batches:
            self.target._residuals(self.g, batch)

    def gradient_only(self):
        from dials_vmerge.backends.cuda_target import gradient_segment_kernel

        for batch in self.target.batches:
            sl = slice(batch.obs_lo, batch.obs_hi)
            gradient_segment_kernel[_blocks(batch.n_segments * self.target.n_params),
                                    THREADS_PER_BLOCK](
                self.target.factor[sl], self.deriv[sl], batch.entry_flat, batch.entry_offset,
                batch.grad_partial)

    def evaluation(self):
        self.model()
        return self.target.evaluate(self.g, self.deriv)

    def variance(self):
        if self.covariance is None:
            return
        dm.variance_of_g_kernel[_blocks(self.n), THREADS_PER_BLOCK](
            self.deriv, self.cols, self.covariance, self.var_g)

    def merge(self):
        merged_means_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.target.weight, self.target.batches[0].group_start
            if len(self.target.batches) == 1 else cuda.to_device(self.lay["group_start"]),
            0.0, self.mean, self.sigma)

    # -- the passes added with the error model, expansion, robust/variational merging and
    # streamed batches; their device inputs are made on first use (not at 1e8 unless timed)
    def error_model_host(self):
        """Error-model refinement inputs from the layout and the current g (numpy)."""
        if getattr(self, "_em_host", None) is None:
            lay = self.lay
            gs = lay["group_start"]
            group = np.repeat(np.arange(self.n_groups, dtype=np.int64), np.diff(gs))
            g = self.g.copy_to_host()
            w, inten = lay["weight"], lay["intensity"]
            u = w * g * g
            total = np.bincount(group, u, minlength=self.n_groups)
            share = u / total[group]
            ih = (np.bincount(group, w * g * inten, minlength=self.n_groups) / total)[group]
            n_h = np.diff(gs)[group].astype(np.float64)
            expected = ih * g
            # ten equal-count bins of expected intensity; a tenth of the observations left
            # out of every bin (bin -1), as bins deleted by the refinement
            edges = np.quantile(expected, np.linspace(0.0, 1.0, 11)[1:-1])
            bin_index = np.searchsorted(edges, expected).astype(np.int64)
            bin_index[::10] = -1
            self._em_host = {
                "intensity": inten, "variance": 1.0 / w, "g": g, "share": share,
                "residual_sq": (inten / g - ih) ** 2, "group": group, "ih": ih,
                "prefactor": np.sqrt(n_h / np.maximum(n_h - 1.0, 1.0)),
                "bin_index": bin_index, "n_bins": 10}
        return self._em_host

    def error_model_sums(self):
        if getattr(self, "_em", None) is None:
            h = self.error_model_host()
            self._em = DeviceErrorModelSums(
                h["intensity"], h["variance"], h["g"], h["share"], h["residual_sq"],
                h["group"], ih=h["ih"], prefactor=h["prefactor"], bin_index=h["bin_index"],
                n_bins=h["n_bins"])
        return self._em

    def error_model_ml(self):
        return self.error_model_sums().a_sq_and_cost(EM_B, -1.0)

    def error_model_slope(self):
        return self.error_model_sums().cost_slope(EM_B, -1.0)

    def error_model_binned(self):
        return self.error_model_sums().binned_deviation_sums(EM_A, EM_B)

    def expand(self):
        """g, dg/dp and var(g) of every row: ScalingRun.expand's device pass."""
        self.model()
        self.variance()

    def merge_inputs(self):
        if getattr(self, "_merge_in", None) is None:
            rng = np.random.default_rng(6)
            centric = (rng.uniform(size=self.n_groups) < 0.1).astype(np.uint8)
            prior = np.full(self.n_groups, float(np.mean(np.abs(self.lay["intensity"]))))
            self._merge_in = {
                "centric": centric, "prior": prior,
                "centric_d": cuda.to_device(centric), "prior_d": cuda.to_device(prior),
                "nodes": cuda.to_device(GL_NODES_8), "weights": cuda.to_device(GL_WEIGHTS_8),
                "fallback": cuda.device_array(self.n_groups, np.uint8),
                "mean_f": cuda.device_array(self.n_groups),
                "sd_f": cuda.device_array(self.n_groups)}
        return self._merge_in

    def merge_robust(self):
        m = self.merge_inputs()
        dmg.student_t_merge_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.sigma_obs, self.group_start, 4.0, 1.5,
            ROBUST_INFO_TO_VARIANCE, ROBUST_GAUSSIAN_FACTOR, 200, 1e-10, 3, self.mean,
            self.sigma, m["fallback"])

    def merge_variational(self):
        """One E-step of variational merging with amplitudes (the final one of a merge)."""
        m = self.merge_inputs()
        dv.posterior_kernel[_blocks(self.n_groups), THREADS_PER_BLOCK](
            self.target.intensity, self.sigma_obs, self.group_start, m["centric_d"],
            m["prior_d"], 0.0, 100, m["nodes"], m["weights"], True, self.mean, self.sigma,
            m["mean_f"], m["sd_f"])

    def streamed_target(self):
        """The target over STREAMED_BATCHES batches of whole groups on two streams."""
        if getattr(self, "_streamed", None) is None:
            lay = self.lay
            self._streamed = DeviceTarget(lay["intensity"], lay["weight"], lay["group_start"],
                                          lay["cols"], lay["n_params"],
                                          -(-self.n // STREAMED_BATCHES))
        return self._streamed

    def evaluation_streamed(self):
        self.model()
        return self.streamed_target().evaluate(self.g, self.deriv)

    # -- the job table's device-side passes (backends/cuda_job_table.py) ---------------
    def job_table_inputs(self):
        """A job-order permutation of the rows (the layout's order as a run's tables see
        it), the per-row dataset and the error-model a, b per dataset."""
        if getattr(self, "_job", None) is None:
            rng = np.random.default_rng(8)
            order = rng.permutation(self.n).astype(np.int64)
            n_sets = N_SWEEPS
            dataset = rng.integers(0, n_sets, self.n).astype(np.int32)
            self._job = {"order": order, "dataset": dataset,
                         "a": np.linspace(1.0, 1.3, n_sets), "b": np.linspace(0.0, 0.05, n_sets),
                         "has": np.array([1, 1, 0, 1][:n_sets], np.int32),
                         "order_d": cuda.to_device(order), "dataset_d": cuda.to_device(dataset),
                         "variance_d": cuda.to_device(1.0 / self.lay["weight"]),
                         "gathered": cuda.device_array(self.n),
                         "weights": cuda.device_array(self.n)}
            self._job.update({k + "_d": cuda.to_device(self._job[k]) for k in ("a", "b", "has")})
        return self._job

    def gather(self):
        """One column of a pass's table gathered from the resident job-order column."""
        j = self.job_table_inputs()
        dg.gather_kernel[_blocks(self.n), THREADS_PER_BLOCK](self.target.intensity,
                                                             j["order_d"], j["gathered"])

    # -- a round's table made on the device (backends/cuda_resident_inputs.py) -----------
    def resident_round_inputs(self):
        """A round's subset of the job rows: keep flags (uint8 per job row, RESIDENT_KEEP of
        them set), the job's group sort as the layout's (the job-order permutation, the
        layout's group offsets) and the ELL columns as resident int64."""
        if getattr(self, "_round", None) is None:
            j = self.job_table_inputs()
            rng = np.random.default_rng(9)
            keep = (rng.random(self.n) < RESIDENT_KEEP).astype(np.uint8)
            self._round = {"keep": keep, "keep_d": cuda.to_device(keep),
                           "group_start_d": cuda.to_device(self.lay["group_start"]),
                           "n_segments": int(segment_bounds(self.n,
                                                            self.lay["n_params"]).size - 1)}
            self._round["order_d"] = j["order_d"]
        return self._round

    def subset_table(self):
        """The round's rows in group order and its group offsets from the keep flags."""
        r = self.resident_round_inputs()
        self._subset = drr.subset_table(r["keep_d"], r["order_d"], r["group_start_d"])

    def entry_plans(self):
        """The column entries' plan a run takes for this layout (entry_plan: the one-pass
        plan per segment, or the radix sort of few segments and many columns, e.g. the KB
        stills from 1e7 observations) and the radix plan forced on it."""
        n_segments = self.resident_round_inputs()["n_segments"]
        return {"column_entries_device": drr.entry_plan(self.n, self.n_slots,
                                                        self.lay["n_params"], n_segments),
                "column_entries_radix": drr.radix_plan(self.n, self.n_slots,
                                                       self.lay["n_params"])}

    def _column_entries(self, name):
        self._entries = drr.column_entries_on_device(
            self.cols, self.lay["n_params"], self.resident_round_inputs()["n_segments"],
            self.entry_plans()[name])
        if self._entries is None:  # past the plans' reach (~2^38 slots): not here
            raise RuntimeError("no device plan for the column entries")

    def column_entries_device(self):
        """The gradient's column entries from the resident ELL columns, the run's plan."""
        self._column_entries("column_entries_device")

    def column_entries_radix(self):
        """The same entries by the radix plan, whatever the run would take."""
        self._column_entries("column_entries_radix")

    def error_model_weights(self):
        j = self.job_table_inputs()
        dg.error_model_weight_kernel[_blocks(self.n), THREADS_PER_BLOCK](
            self.target.intensity, j["variance_d"], j["dataset_d"], j["a_d"], j["b_d"],
            j["has_d"], j["weights"])

    def host_streamed(self):
        """The target and normal equations over the layout kept in page-locked host memory,
        STREAMED_BATCHES batches of whole groups on two streams (KB and physical layouts)."""
        if getattr(self, "_host_streamed", None) is None:
            lay = self.lay
            if lay["kind"] == "kb":
                inputs = {"row_dataset": lay["row_dataset"],
                          "inv_two_d_sq": lay["inv_two_d_sq"]}
            elif lay["kind"] == "physical":
                inputs = {"record": lay["record"], "first_param": lay["first_param"],
                          "absorption": lay["absorption_coefficients"],
                          "absorption_first": lay["absorption_first"]}
            else:
                inputs = {"weights": lay["weights"], "full_index": lay["full_index"]}
            self._host_streamed = HostStreamedTarget(
                lay["intensity"], lay["weight"], lay["group_start"], lay["cols"],
                lay["n_params"], -(-self.n // STREAMED_BATCHES), inputs)
        return self._host_streamed

    def _launch_streamed_model(self, stream, v, g, deriv):
        kind, blocks = self.lay["kind"], _blocks(g.shape[0])
        if kind == "kb":
            dm.kb_family_kernel[blocks, THREADS_PER_BLOCK, stream](
                v["row_dataset"], v["inv_two_d_sq"], self.fixed, False, self.scale_value,
                self.decay_value, g, deriv)
        elif kind == "array":
            da.array_model_kernel[blocks, THREADS_PER_BLOCK, stream](
                v["weights"], v["full_index"], self.component_start, self.fixed, False,
                self.parameters, g, deriv)
        else:
            dm.physical_model_kernel[blocks, THREADS_PER_BLOCK, stream](
                v["record"], v["first_param"], v["absorption"], v["absorption_first"], True,
                self.fixed, False, self.parameters, g, deriv)

    def evaluation_host_streamed(self):
        return self.host_streamed().evaluate(self._launch_streamed_model)

    def normal_host_streamed(self):
        if getattr(self, "_streamed_normal", None) is None:
            self._streamed_normal = StreamedNormalEquations(
                self.host_streamed(), self.lay["cols"], self.lay["n_params"])
        return self._streamed_normal.evaluate(self._launch_streamed_model)

    def host_streamed_bytes(self):
        """Bytes copied host -> device by one streamed evaluation (the whole layout)."""
        t = self.host_streamed()
        total = sum(int(a.nbytes) for a in t.host.values())
        for batch in t.batches:
            total += sum(int(a.nbytes) for a in batch.host.values())
        return total

    def bytes_per_pass(self):
        """(read + written) bytes of each pass, counting every array element once."""
        n, k = self.n, self.n_slots
        used = int(np.count_nonzero(self.lay["cols"] >= 0))
        groups = 8 * (self.n_groups + 1)
        if self.lay["kind"] == "kb":
            model_in = n * 16
        elif self.lay["kind"] == "array":
            model_in = n * k * 16
        else:
            model_in = n * (64 + 8 + 8 * N_ABSORPTION + 4)
        out = {
            "model": model_in + n * 8 * (1 + k),
            "model_g": model_in + n * 8,
            "residuals": n * 8 * 4 + groups,
            "gradient": used * 24,
            "var_g": n * 16 * k + n * 8,
            "merge": n * 16 + groups + 16 * self.n_groups,
            "merge_classical": n * 16 + groups + 16 * self.n_groups,
            "statistics_sums": n * 8 + groups + 24 * self.n_groups,
            # capped weights (w read, scratch and capped written) and the z-test (I, w, g
            # read, mask written)
            "outliers": n * (8 + 16) + n * (24 + 1) + 2 * groups,
            # one read of I, w, g, dg/dp and the columns; the dense partials are not counted
            "normal": n * 24 + n * k * 16 + groups,
        }
        out["evaluation"] = out["model"] + out["residuals"] + out["gradient"]
        out["evaluation_streamed"] = out["evaluation"]
        out["expand"] = out["model"] + out["var_g"]
        # unit and ratio pass (I, sigma^2, g, p, r^2 read, unit written) and the log pass
        out["error_model_ml"] = n * 48 + groups + n * 8
        # u and u' written, then read with r^2
        out["error_model_slope"] = n * 56 + groups + n * 24
        out["error_model_binned"] = n * 48
        # each element counted once: the IRLS iterations re-read a group from cache
        out["merge_robust"] = n * 16 + groups + 17 * self.n_groups
        out["merge_variational"] = n * 16 + groups + 9 * self.n_groups + 32 * self.n_groups
        # the job table: a gathered column (source, order read; column written) and the
        # error-model weights (I, sigma^2, dataset read; w written)
        out["gather"] = n * 24
        out["em_weights"] = n * 28
        # a round's table: the keep flags read through the group sort (twice: count, then
        # write), each row's position written, the kept rows' job rows written, and per
        # group its two offsets and the two positions they point at (twice)
        kept = int(RESIDENT_KEEP * n)
        out["subset_table"] = 2 * n * 9 + n * 8 + kept * 8 + 2 * (2 * groups + 16 * self.n_groups)
        for name, plan in self.entry_plans().items():
            out[name] = self.entry_bytes(plan, used)
        return out

    def entry_bytes(self, plan, used):
        """Bytes a column-entry plan reads and writes: the int64 ELL columns read twice
        (count, then fill) and every used slot's entry written (the one-pass plan: the
        entries themselves; the radix plan's passes: (int32 column, int64 position) pairs,
        each later pass reading them twice and writing them), and the radix plan's binary
        searches (~log2(used) pairs per column and segment bound, and the offsets)."""
        n, k = self.n, self.n_slots
        if plan[0] == "segments":
            return 2 * n * k * 8 + used * 8
        passes = plan[2]
        n_offsets = self.lay["n_params"] * (self.resident_round_inputs()["n_segments"] + 1)
        return (2 * n * k * 8 + used * 12 + (passes - 1) * used * (4 + 12 + 12)
                + n_offsets * (12 * max(1, used).bit_length() + 8))


# -- a job of two model families (KB stills and physical sweeps with absorption): each family's
# kernel on its rows, scattered into the combined table (backends/cuda_mixed_models.py)
class MixedLayout:
    """Half the rows KB stills, half physical sweeps, interleaved at random (a table in group
    order mixes the families); the families' inputs in their own row order, their table
    positions, the combined free ELL columns (KB's K, B first, then the physical full
    vector's entries; the guard's -1), the device buffers and a DeviceTarget."""

    def __init__(self, n, seed=6):
        from dials_vmerge.kernels.cuda import families as dfam

        self.dfam = dfam
        rng = np.random.default_rng(seed)
        n_kb = n // 2
        self.kb, self.ph = kb_layout(n_kb, seed=1), physical_layout(n - n_kb, seed=2)
        self.n = n
        family = np.zeros(n, np.int32)
        family[rng.permutation(n)[:n - n_kb]] = 1
        self.family_host = family
        self.positions_host = [np.flatnonzero(family == f).astype(np.int64) for f in (0, 1)]
        kb_par = self.kb["n_params"]
        self.free_of_full = np.concatenate([kb_par + np.arange(self.ph["n_full"]),
                                            np.full(5, -1)]).astype(np.int64)
        self.n_params = kb_par + self.ph["n_full"]
        self.width = self.ph["cols"].shape[1]
        cols = np.full((n, self.width), -1, np.int64)
        cols[self.positions_host[0], :2] = self.kb["cols"]
        cols[self.positions_host[1]] = self.free_of_full[self.ph["cols"]]
        self.cols_host = cols
        self.intensity = rng.exponential(500.0, n)
        self.weight = rng.uniform(0.001, 0.01, n)
        self.group_start = group_offsets(rng, n)
        put = cuda.to_device
        kb, ph = self.kb, self.ph
        self.kb_in = [put(kb["row_dataset"]), put(kb["inv_two_d_sq"]), put(np.ones(1)), False,
                      put(kb["scale_value"]), put(kb["decay_value"])]
        self.ph_in = [put(ph["record"]), put(ph["first_param"]),
                      put(ph["absorption_coefficients"]), put(ph["absorption_first"]), True,
                      put(np.ones(1)), False, put(ph["parameters"])]
        self.positions = [put(p) for p in self.positions_host]
        self.family_g = [cuda.device_array(p.size) for p in self.positions_host]
        self.family_deriv = [cuda.device_array((self.positions_host[0].size, 2)),
                             cuda.device_array((self.positions_host[1].size, self.width))]
        self.g = cuda.device_array(n)
        self.deriv = cuda.device_array((n, self.width))
        dfam.fill_rows_kernel[_blocks(n), THREADS_PER_BLOCK](self.deriv, 0.0)
        self.cols = put(cols)
        self.target = DeviceTarget(self.intensity, self.weight, self.group_start, cols,
                                   self.n_params)
        # the round's split, as backends.cuda_mixed_models.resident_families makes it: the
        # job's rows are the KB dataset's, then the physical one's; the table's row i is
        # job row order[i]; its family and its row in the family's inputs are found on the
        # device (a binary search of the datasets' offsets), then each family's positions
        order = np.empty(n, np.int64)
        order[self.positions_host[0]] = np.arange(n_kb)
        order[self.positions_host[1]] = n_kb + np.arange(n - n_kb)
        self.order = put(order)
        self.job_offsets = put(np.array([0, n_kb, n], np.int64))
        self.dataset_family = put(np.array([0, 1], np.int32))
        self.dataset_local = put(np.zeros(2, np.int64))
        self.row_family = cuda.device_array(n, np.int32)
        self.local_row = cuda.device_array(n, np.int64)

    def model(self):
        """Both families' kernels into their buffers, scattered into the combined table."""
        f = self.dfam
        pk, pp = self.positions
        dm.kb_family_kernel[_blocks(pk.size), THREADS_PER_BLOCK](
            *self.kb_in, self.family_g[0], self.family_deriv[0])
        dm.physical_model_kernel[_blocks(pp.size), THREADS_PER_BLOCK](
            *self.ph_in, self.family_g[1], self.family_deriv[1])
        for k, pos in enumerate(self.positions):
            f.scatter_kernel[_blocks(pos.size), THREADS_PER_BLOCK](self.family_g[k], pos,
                                                                    self.g)
            f.scatter_rows_kernel[_blocks(pos.size), THREADS_PER_BLOCK](
                self.family_deriv[k], pos, self.deriv)

    def split(self):
        """Each family's table positions from the per-row family (count, scan, fill)."""
        self.dfam.row_family_kernel[_blocks(self.n), THREADS_PER_BLOCK](
            self.order, self.job_offsets, self.dataset_family, self.dataset_local,
            self.row_family, self.local_row)
        out = []
        for k in (0, 1):
            chunk, offsets = drr._exclusive_chunk_offsets(
                self.dfam.family_count_kernel, (self.row_family, np.int32(k)), self.n)
            m = int(offsets[offsets.shape[0] - 1:].copy_to_host()[0])
            positions = cuda.device_array(max(m, 1), np.int64)
            source = cuda.device_array(max(m, 1), np.int64)
            self.dfam.family_fill_kernel[_blocks(offsets.shape[0] - 1), THREADS_PER_BLOCK](
                self.row_family, self.local_row, np.int32(k), chunk, offsets, positions,
                source)
            out.append((positions[:m], source[:m]))
        return out

    def evaluation(self):
        self.model()
        return self.target.evaluate(self.g, self.deriv)

    def bytes_per_pass(self):
        nk, npp = (p.size for p in self.positions_host)
        kb_model = nk * 16 + nk * 8 * 3
        ph_model = npp * (64 + 8 + 8 * N_ABSORPTION + 4) + npp * 8 * (1 + self.width)
        scatter = (nk * (8 + 16 + 8) + npp * (8 + 8 * self.width + 8)) * 2
        used = int(np.count_nonzero(self.cols_host >= 0))
        model = kb_model + ph_model + scatter
        return {"mixed_model": model,
                # order in, family and local row out; per family a count pass and a
                # fill pass (family read, local read, positions and source written)
                "mixed_split": self.n * (8 + 4 + 8) + 2 * self.n * 4 + self.n * (4 + 8)
                + self.n * 16,
                "mixed_evaluation": model + self.n * 8 * 4 + used * 24}


def check_mixed(n):
    """The mixed layout's device g, dg/dp and target/gradient against the CPU family
    kernels (kernels.kb_family, kernels.physical_family) combined as ModelFamilies does;
    the device's split of the rows by family against numpy's."""
    from dials_vmerge.kernels.kb_family import evaluate_kb_family
    from dials_vmerge.kernels.physical_family import evaluate_smooth_rotation_family
    from dials_vmerge.scaling.target import target_and_gradient

    mix = MixedLayout(n)
    kb, ph = mix.kb, mix.ph
    g_k, v_k, c_k = evaluate_kb_family(kb["row_dataset"], kb["inv_two_d_sq"], None,
                                       kb["scale_value"], kb["decay_value"], kb["scale_col"],
                                       kb["decay_col"])
    g_p, v_p, c_p = evaluate_smooth_rotation_family(
        ph["record"], ph["first_param"], ph["absorption_coefficients"],
        ph["absorption_first"], None, ph["parameters"], mix.free_of_full.astype(np.int32))
    g_cpu = np.empty(n)
    values = np.zeros((n, mix.width))
    cols = np.full((n, mix.width), -1, np.int64)
    for (g_f, v_f, c_f), pos in zip(((g_k, v_k, c_k), (g_p, v_p, c_p)), mix.positions_host):
        g_cpu[pos] = g_f
        values[pos, :v_f.shape[1]] = v_f
        cols[pos, :c_f.shape[1]] = c_f
    mix.model()
    out = {"mixed_columns": float(np.count_nonzero(cols != mix.cols_host)),
           "mixed_model": max(relative(mix.g.copy_to_host(), g_cpu),
                              relative(mix.deriv.copy_to_host(), values))}
    phi_cpu, grad_cpu = target_and_gradient(mix.intensity, mix.weight, g_cpu, values, cols,
                                            mix.group_start, mix.n_params, 4)
    phi_dev, grad_dev = mix.target.evaluate(mix.g, mix.deriv)
    out["mixed_target_phi"] = relative(phi_dev, phi_cpu)
    out["mixed_target_gradient"] = float(np.max(np.abs(grad_dev - grad_cpu))
                                         / np.max(np.abs(grad_cpu)))
    split = mix.split()
    # each family's table positions and its rows of the family's inputs (all, in order)
    out["mixed_split"] = float(sum(
        (not np.array_equal(p.copy_to_host(), q))
        + (not np.array_equal(src.copy_to_host(), np.arange(q.size)))
        for (p, src), q in zip(split, mix.positions_host)))
    return out


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(b), 1e-300)
    return float(np.max(np.abs(a - b) / scale))


def check_normal(dev):
    """Normal equations (phi, J^T W r, J^T W J) of the device pass against the CPU kernel."""
    from dials_vmerge.scaling.target import normal_equations

    lay = dev.lay
    dev.model()
    phi_n, rhs_n, normal_n = dev.normal_equations()
    phi_c, rhs_c, normal_c = normal_equations(
        lay["intensity"], lay["weight"], dev.g.copy_to_host(), dev.deriv.copy_to_host(),
        np.ascontiguousarray(lay["cols"], dtype=np.int64), lay["group_start"],
        lay["n_params"], 4)
    return max(relative(phi_n, phi_c),
               float(np.max(np.abs(rhs_n - rhs_c)) / np.max(np.abs(rhs_c))),
               float(np.max(np.abs(normal_n - normal_c)) / np.max(np.abs(normal_c))))


def check_against_cpu(dev):
    """Max relative difference of every device kernel to its CPU twin on this layout."""
    from types import SimpleNamespace

    from dials_vmerge.scaling.ih_table import chunk_bounds, merged_intensity_kernel
    from dials_vmerge.scaling.target import target_and_gradient, variance_of_g

    lay = dev.lay
    out = {}
    dev.model()
    g_dev, deriv_dev = dev.g.copy_to_host(), dev.deriv.copy_to_host()
    cols = np.ascontiguousarray(lay["cols"], dtype=np.int64)
    if lay["kind"] == "array":
        from dials_vmerge.model.base import product_rule
        from dials_vmerge.model.smoother import ell_values

        cs = lay["component_start"]
        values = np.vstack([ell_values(np.ascontiguousarray(lay["weights"][:, a:b]),
                                       np.ascontiguousarray(lay["full_index"][:, a:b]),
                                       lay["parameters"]) for a, b in zip(cs[:-1], cs[1:])])
        g_cpu, deriv_cpu = product_rule(values, np.ascontiguousarray(lay["weights"]), cs)
        out["model"] = max(relative(g_dev, g_cpu), relative(deriv_dev, deriv_cpu))
        dev.model_g()
        out["model_g"] = relative(dev.g.copy_to_host(), g_cpu)
        dev.model()
        phi_cpu, grad_cpu = target_and_gradient(
            lay["intensity"], lay["weight"], g_cpu, deriv_cpu, cols, lay["group_start"],
            lay["n_params"], 4)
    elif lay["kind"] == "kb":
        from dials_vmerge.kernels.kb_family import evaluate_kb_family, evaluate_kb_family_g

        g_cpu, deriv_cpu, cols_cpu = evaluate_kb_family(
            lay["row_dataset"], lay["inv_two_d_sq"], None, lay["scale_value"],
            lay["decay_value"], lay["scale_col"], lay["decay_col"])
        assert np.array_equal(cols_cpu, lay["cols"])
        out["model"] = max(relative(g_dev, g_cpu), relative(deriv_dev, deriv_cpu))
        dev.model_g()
        out["model_g"] = relative(dev.g.copy_to_host(), evaluate_kb_family_g(
            lay["row_dataset"], lay["inv_two_d_sq"], None, lay["scale_value"],
            lay["decay_value"]))
        dev.model()
        phi_cpu, grad_cpu = target_and_gradient(
            lay["intensity"], lay["weight"], g_cpu, deriv_cpu, cols_cpu, lay["group_start"],
            lay["n_params"], 4)
    else:
        from dials_vmerge.scaling.physical_pass import physical_target_and_gradient

        p, r, fp = lay["parameters"], lay["record"], lay["first_param"].astype(np.int64)
        # independent numpy recomputation of g (no CPU g-only kernel exists for this layout)
        s = sum(r[:, 2 + j] * p[fp[:, 0] + j] for j in range(3))
        e = np.exp(sum(r[:, 5 + j] * p[fp[:, 1] + j] for j in range(3)))
        a = 1.0 + sum(lay["absorption_coefficients"][:, k] * p[lay["absorption_first"] + k]
                      for k in range(N_ABSORPTION))
        g_ref = s * e * a
        out["model"] = relative(g_dev, g_ref)
        dev.model_g()
        out["model_g"] = relative(dev.g.copy_to_host(), g_ref)
        dev.model()
        inputs = SimpleNamespace(record=r, first_param=lay["first_param"],
                                 absorption_coefficients=lay["absorption_coefficients"],
                                 absorption_first=lay["absorption_first"], fixed_factor=None,
                                 n_full=lay["n_full"])
        gs = lay["group_start"]
        phi_cpu, grad_full = physical_target_and_gradient(
            inputs, gs, chunk_bounds(gs, 4), int(np.diff(gs).max()), parameters=p)
        grad_cpu = np.concatenate([grad_full, np.zeros(5)])
        g_cpu = g_ref
    phi_dev, grad_dev = dev.target.evaluate(dev.g, dev.deriv)
    out["target_phi"] = relative(phi_dev, phi_cpu)
    keep = slice(0, lay.get("n_full", lay["n_params"]))
    out["target_gradient"] = float(np.max(np.abs(grad_dev[keep] - grad_cpu[keep]))
                                   / np.max(np.abs(grad_cpu[keep])))
    ih_cpu = np.empty(dev.n_groups)
    merged_intensity_kernel(lay["intensity"], lay["weight"], g_cpu, lay["group_start"],
                            chunk_bounds(lay["group_start"], 1), ih_cpu)
    out["merged_intensity"] = relative(dev.target.merged_intensity(dev.g), ih_cpu)
    if dev.covariance is not None:
        dev.variance()
        out["var_g"] = relative(dev.var_g.copy_to_host(),
                                variance_of_g(deriv_dev, cols, dev.covariance_host))
    # outlier rejection: capped weights and the standard test, the same mask as the CPU
    from dials_vmerge.scaling.outliers import standard_outliers

    table = SimpleNamespace(intensity=lay["intensity"], weight=lay["weight"], g=g_dev,
                            group_start=lay["group_start"], n_obs=dev.n)
    dev.outliers()
    mask_cpu = standard_outliers(table, 6.0, 4)
    out["outliers"] = float(np.count_nonzero(dev.outlier.copy_to_host().astype(bool)
                                             != mask_cpu))
    if lay["kind"] in NORMAL_LAYOUTS:
        size = min(dev.n, NORMAL_CHECK_MAX[lay["kind"]])
        small = dev if size == dev.n else DeviceLayout(build_layout(lay["kind"], size))
        out["normal"] = check_normal(small)
    # classical merge (internal variance, as the statistics) and the Rmerge sums, against a
    # numpy recomputation (merging.classical's CPU kernels import cctbx with their package;
    # tests/test_cuda_passes.py compares with those kernels). Every sigma > 0 here, so every
    # observation is used.
    grp = np.repeat(np.arange(dev.n_groups), np.diff(lay["group_start"]))
    w, inten = lay["weight"], lay["intensity"]
    s_w = np.bincount(grp, w, minlength=dev.n_groups)
    mean_c = np.bincount(grp, w * inten, minlength=dev.n_groups) / s_w
    n_used = np.diff(lay["group_start"])
    s_w_sq = np.bincount(grp, w * w, minlength=dev.n_groups)
    s_wd = np.bincount(grp, w * (inten - mean_c[grp]) ** 2, minlength=dev.n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        internal = s_w / (s_w * s_w - s_w_sq) * s_wd / n_used
    sig_c = np.where(n_used == 1, np.sqrt(1.0 / s_w), np.sqrt(np.maximum(internal, 1.0 / s_w)))
    dev.merge_classical()
    out["merge_classical"] = max(relative(dev.mean.copy_to_host(), mean_c),
                                 relative(dev.sigma.copy_to_host(), sig_c))
    dev.statistics_sums()  # about the device means, as the statistics
    mean_d = dev.mean.copy_to_host()
    dev_c = np.bincount(grp, np.abs(inten - mean_d[grp]), minlength=dev.n_groups)
    tot_c = np.bincount(grp, inten, minlength=dev.n_groups)
    out["statistics_sums"] = max(relative(dev.abs_dev.copy_to_host(), dev_c),
                                 relative(dev.total.copy_to_host(), tot_c))
    out.update(check_new_passes(dev))
    dev.merge()
    s_w = np.bincount(grp, lay["weight"], minlength=dev.n_groups)
    s_wi = np.bincount(grp, lay["weight"] * lay["intensity"], minlength=dev.n_groups)
    out["merge"] = max(relative(dev.mean.copy_to_host(), s_wi / s_w),
                       relative(dev.sigma.copy_to_host(), np.sqrt(1.0 / s_w)))
    return out


def check_new_passes(dev):
    """The error-model sums, g and var(g) expansion, robust and variational merging and the
    streamed target against their CPU kernels (kernel layer: no cctbx)."""
    from dials_vmerge.kernels import error_model_ml as em_cpu
    from dials_vmerge.kernels import merging as merge_cpu

    out = {}
    lay = dev.lay
    dev.model()
    h = dev.error_model_host()
    n = dev.n
    a_sq_c, cost_c = em_cpu.a_sq_and_cost_kernel(
        h["intensity"], h["variance"], h["g"], h["share"], h["group"], h["residual_sq"],
        dev.n_groups, EM_B, -1.0, np.empty(n))
    a_sq_d, cost_d = dev.error_model_ml()
    out["error_model_ml"] = max(relative(a_sq_d, a_sq_c), relative(cost_d, cost_c))
    slope_c = em_cpu.cost_slope_kernel(
        h["intensity"], h["variance"], h["g"], h["share"], h["group"], h["residual_sq"],
        dev.n_groups, EM_B, -1.0, np.empty(n), np.empty(n))
    # the slope is a difference of two sums: relative to the larger of them
    scale = float(np.sum(np.abs(h["residual_sq"]))) if slope_c == 0 else abs(slope_c)
    out["error_model_slope"] = abs(dev.error_model_slope() - slope_c) / scale
    s1c, s2c = em_cpu.binned_deviation_sums(h["intensity"], h["variance"], h["g"], h["ih"],
                                            h["prefactor"], h["bin_index"], h["n_bins"],
                                            EM_A, EM_B)
    s1d, s2d = dev.error_model_binned()
    # sum delta is a sum of signed terms: relative to sum |delta| (~ sqrt(sum delta^2 n))
    s1_scale = np.sqrt(s2c * np.bincount(h["bin_index"][h["bin_index"] >= 0],
                                         minlength=h["n_bins"]))
    out["error_model_binned"] = max(float(np.max(np.abs(s1d - s1c) / s1_scale)),
                                    relative(s2d, s2c))
    # expansion: g, dg/dp and var(g) of every row (the model kernels and var(g)), as checked
    # above pass by pass; here the call ScalingRun.expand makes, against the CPU twins
    if dev.covariance is not None:
        dev.expand()
        from dials_vmerge.scaling.target import variance_of_g

        out["expand_var_g"] = relative(
            dev.var_g.copy_to_host(),
            variance_of_g(dev.deriv.copy_to_host(),
                          np.ascontiguousarray(lay["cols"], dtype=np.int64),
                          dev.covariance_host))
    sigma = 1.0 / np.sqrt(lay["weight"])
    gs = lay["group_start"]
    mean_c, sig_c, fallback_c = merge_cpu.student_t_merge_kernel(
        lay["intensity"], sigma, gs, 4.0, 1.5, ROBUST_INFO_TO_VARIANCE,
        ROBUST_GAUSSIAN_FACTOR, 200, 1e-10, 3)
    dev.merge_robust()
    out["merge_robust"] = max(relative(dev.mean.copy_to_host(), mean_c),
                              relative(dev.sigma.copy_to_host(), sig_c))
    out["merge_robust_fallback"] = float(np.count_nonzero(
        dev.merge_inputs()["fallback"].copy_to_host().astype(bool) != fallback_c))
    m = dev.merge_inputs()
    mj, sj, mf, sf = merge_cpu.posterior_kernel(
        lay["intensity"], sigma, gs, m["centric"].astype(np.bool_), m["prior"], 0.0, 100,
        GL_NODES_8, GL_WEIGHTS_8, True)
    dev.merge_variational()
    out["merge_variational"] = max(relative(dev.mean.copy_to_host(), mj),
                                   relative(dev.sigma.copy_to_host(), sj),
                                   relative(m["mean_f"].copy_to_host(), mf),
                                   relative(m["sd_f"].copy_to_host(), sf))
    phi_1, grad_1 = dev.evaluation()
    phi_s, grad_s = dev.evaluation_streamed()
    out["evaluation_streamed"] = max(relative(phi_s, phi_1),
                                     float(np.max(np.abs(grad_s - grad_1))
                                           / max(np.max(np.abs(grad_1)), 1e-300)))
    out.update(check_job_table(dev))
    # the layout kept in host memory: target (same batches as the device-resident
    # DeviceTarget of evaluation_streamed: bit-identical) and normal equations
    phi_h, grad_h = dev.evaluation_host_streamed()
    out["evaluation_host_streamed"] = max(relative(phi_h, phi_s),
                                          float(np.max(np.abs(grad_h - grad_s))
                                                / max(np.max(np.abs(grad_s)), 1e-300)))
    if lay["kind"] in NORMAL_LAYOUTS and dev.n <= NORMAL_CHECK_MAX[lay["kind"]]:
        dev.model()
        resident = dev.normal_equations()
        streamed = dev.normal_host_streamed()
        out["normal_host_streamed"] = max(relative(u, v) for u, v in zip(streamed, resident))
    dev.__dict__.pop("_host_streamed", None)  # its page-locked copy of the layout
    dev.__dict__.pop("_streamed_normal", None)
    return out


def check_job_table(dev):
    """The job table's device passes: a gathered column equals numpy's fancy index, the
    error-model weights numpy's formula, and the outlier mask of the gathered (resident)
    table the mask of the table copied up from the host."""
    out = {}
    j = dev.job_table_inputs()
    lay = dev.lay
    dev.gather()
    out["gather"] = float(np.count_nonzero(j["gathered"].copy_to_host()
                                           != lay["intensity"][j["order"]]))
    dev.error_model_weights()
    intensity, variance = lay["intensity"], 1.0 / lay["weight"]
    a, b, has = j["a"][j["dataset"]], j["b"][j["dataset"]], j["has"][j["dataset"]]
    expected = np.where(has == 1, 1.0 / (a * a * (variance + (b * intensity) ** 2)),
                        1.0 / variance)
    out["em_weights"] = relative(j["weights"].copy_to_host(), expected)
    dev.model_g()
    g_host = dev.g.copy_to_host()
    mask_host = do.outlier_mask(lay["intensity"], lay["weight"], g_host, lay["group_start"])
    mask_resident = do.resident_outlier_mask(dev.target.intensity, dev.target.weight, dev.g,
                                             dev.group_start)
    out["outliers_resident"] = float(np.count_nonzero(mask_host != mask_resident))
    # a round's table on the device against numpy (GroupLayout.subset's arithmetic, written
    # out here): the kept rows in group order, the offsets of the groups that keep one
    r = dev.resident_round_inputs()
    dev.subset_table()
    order_d, group_start_d, n_rows, n_groups = dev._subset
    kept = r["keep"][j["order"]] == 1
    per_group = np.add.reduceat(kept.astype(np.int64), lay["group_start"][:-1]) \
        if dev.n_groups else np.zeros(0, np.int64)
    per_group[np.diff(lay["group_start"]) == 0] = 0
    counts = per_group[per_group > 0]
    expected_start = np.concatenate([[0], np.cumsum(counts)])
    out["subset_table"] = float(
        (n_rows != int(kept.sum())) + (n_groups != counts.size)
        + np.count_nonzero(order_d.copy_to_host()[:n_rows] != j["order"][kept])
        + np.count_nonzero(group_start_d.copy_to_host() != expected_start))
    # the gradient's column entries against the host's counting sort: the run's plan and
    # the radix plan (few segments and many columns) forced on the same layout
    from dials_vmerge.kernels.cuda.target import column_entries

    bounds = segment_bounds(dev.n, lay["n_params"])
    flat, offset = column_entries(lay["cols"], lay["n_params"], bounds)
    for name in ("column_entries_device", "column_entries_radix"):
        getattr(dev, name)()
        flat_d, offset_d = dev._entries
        out[name] = float(np.count_nonzero(offset_d.copy_to_host() != offset)
                          + np.count_nonzero(flat_d.copy_to_host()[:flat.size] != flat))
    return out


def copy_rate():
    """Device-to-device bytes moved (read + written) per second, from a 1 GiB copy."""
    n = (1 << 30) // 8 if not _simulator() else 1 << 12
    src = cuda.to_device(np.ones(n))
    dst = cuda.device_array(n)
    dst.copy_to_device(src)
    cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_to_device(src)
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2.0 * n * 8 / float(np.median(times))


def host_to_device_rate():
    """Bytes per second of a page-locked host -> device copy of 256 MiB (the streamed
    target's link)."""
    n = (1 << 28) // 8 if not _simulator() else 1 << 12
    src = cuda.pinned_array(n)
    src[:] = 1.0
    dst = cuda.device_array(n)
    dst.copy_to_device(src)
    cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_to_device(src)
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n * 8 / float(np.median(times))


def _simulator():
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def timed(function, repeats):
    function()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def device_description():
    if _simulator():
        return {"name": "numba CUDA simulator", "memory_gib": None}
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    free, total = cuda.current_context().get_memory_info()
    return {"name": name, "memory_gib": round(total / 2 ** 30, 1),
            "compute_capability": list(dev.compute_capability)}


def parse_size(text):
    return int(float(text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8",
                        help="observations per layout, comma-separated")
    parser.add_argument("--check-size", default="1e6", help="layout size of the CPU checks")
    parser.add_argument("--layouts", default="kb,physical,array")
    parser.add_argument("--array-max", default="1e7",
                        help="largest array layout timed (device memory ~1 kB/observation)")
    parser.add_argument("--normal-max", default="1e6",
                        help="largest layout whose normal-equation pass is timed")
    parser.add_argument("--normal-layouts", default="physical,array",
                        help="layouts whose normal equations are checked against the CPU")
    parser.add_argument("--normal-check-size", default=None,
                        help="largest layout of the normal-equation checks (default: "
                             "1e6 physical, 1e5 array)")
    parser.add_argument("--extra-max", default="1e8",
                        help="largest layout whose error-model, expansion, robust, "
                             "variational and streamed passes are timed")
    parser.add_argument("--streamed-max", default="1e7",
                        help="largest layout whose host-streamed target (the whole layout "
                             "over the host link per call) is timed")
    parser.add_argument("--mixed-max", default="1e7",
                        help="largest layout of two model families (KB and physical rows "
                             "interleaved) checked and timed; 0: none")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="JSON path (default $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args(argv)
    NORMAL_LAYOUTS[:] = [k.strip() for k in args.normal_layouts.split(",") if k.strip()]
    if args.normal_check_size is not None:
        for kind in NORMAL_CHECK_MAX:
            NORMAL_CHECK_MAX[kind] = parse_size(args.normal_check_size)
    if not cuda.is_available():
        print("gpu_check: no CUDA GPU visible to numba (set NUMBA_ENABLE_CUDASIM=1 for the "
              "simulator)", file=sys.stderr)
        return 1
    out_path = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json")
                            if os.environ.get("OUT") else None)
    import numba

    result = {"device": device_description(), "numba": numba.__version__,
              "tolerance": TOLERANCE, "checks": {}, "timings": []}
    try:
        import numba_cuda  # noqa: F401

        result["numba_cuda"] = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        result["numba_cuda"] = None
    t_start = time.perf_counter()
    rate = copy_rate()
    result["copy_rate_gb_s"] = rate / 1e9
    h2d = host_to_device_rate()
    result["host_to_device_rate_gb_s"] = h2d / 1e9
    print(f"device: {result['device']['name']}  numba {result['numba']}  "
          f"numba-cuda {result['numba_cuda']}")
    print(f"device-to-device copy rate: {rate / 1e9:.1f} GB/s (read + written)")
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    ok = True
    check_size = parse_size(args.check_size)
    for kind in layouts:
        dev = DeviceLayout(build_layout(kind, check_size))
        checks = check_against_cpu(dev)
        result["checks"][kind] = {"size": check_size, **checks}
        for name, value in checks.items():
            passed = value <= TOLERANCE
            ok &= passed
            print(f"check {kind:9s} {name:17s} max rel diff {value:.2e} "
                  f"{'ok' if passed else 'FAIL'}")
        del dev
    mixed_max = parse_size(args.mixed_max)
    if mixed_max > 0:
        checks = check_mixed(min(check_size, mixed_max))
        result["checks"]["mixed"] = {"size": min(check_size, mixed_max), **checks}
        for name, value in checks.items():
            passed = value <= TOLERANCE
            ok &= passed
            print(f"check {'mixed':9s} {name:17s} max rel diff {value:.2e} "
                  f"{'ok' if passed else 'FAIL'}")
    header = (f"{'layout':9s} {'n_obs':>10s} {'pass':12s} {'time ms':>10s} {'bound ms':>10s} "
              f"{'ratio':>7s}")
    print(header)
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        for kind in layouts:
            if kind == "array" and size > parse_size(args.array_max):
                print(f"{kind:9s} {size:10d} skipped: above --array-max")
                result["timings"].append({"layout": kind, "n_obs": size,
                                          "skipped": "above --array-max"})
                continue
            t0 = time.perf_counter()
            lay = build_layout(kind, size)
            t_host = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                dev = DeviceLayout(lay)
            except Exception as e:  # e.g. out of device memory at 1e8
                print(f"{kind:9s} {size:10d} skipped: {type(e).__name__}: {e}")
                result["timings"].append({"layout": kind, "n_obs": size,
                                          "skipped": f"{type(e).__name__}: {e}"})
                continue
            t_upload = time.perf_counter() - t0
            passes = {"model": dev.model, "model_g": dev.model_g, "residuals": dev.residuals,
                      "gradient": dev.gradient_only, "var_g": dev.variance,
                      "merge": dev.merge, "merge_classical": dev.merge_classical,
                      "statistics_sums": dev.statistics_sums, "outliers": dev.outliers,
                      "evaluation": dev.evaluation}
            if size <= parse_size(args.extra_max):
                passes.update({
                    "expand": dev.expand, "error_model_ml": dev.error_model_ml,
                    "error_model_slope": dev.error_model_slope,
                    "error_model_binned": dev.error_model_binned,
                    "merge_robust": dev.merge_robust,
                    "merge_variational": dev.merge_variational,
                    "evaluation_streamed": dev.evaluation_streamed})
                passes.update({"gather": dev.gather, "em_weights": dev.error_model_weights,
                               "subset_table": dev.subset_table,
                               "column_entries_device": dev.column_entries_device})
                # the radix plan timed on the KB layouts where a run takes the one-pass
                # plan (from 1e7 the run's own plan is the radix one)
                if kind == "kb" and dev.entry_plans()["column_entries_device"][0] != "radix":
                    passes["column_entries_radix"] = dev.column_entries_radix
            if kind != "array" and size <= parse_size(args.streamed_max):
                passes["evaluation_host_streamed"] = dev.evaluation_host_streamed
            if kind == "physical" and size <= parse_size(args.normal_max):
                passes["normal"] = dev.normal_equations
                passes["normal_host_streamed"] = dev.normal_host_streamed
            moved = dev.bytes_per_pass()
            if "evaluation_host_streamed" in passes:
                # bound: the whole layout over the host link at the measured pinned
                # host-to-device rate, expressed in device-copy bytes for the ratio below
                streamed_bytes = dev.host_streamed_bytes()
                moved["evaluation_host_streamed"] = streamed_bytes * rate / h2d
                moved["normal_host_streamed"] = (streamed_bytes + 8 * dev.n * dev.n_slots) \
                    * rate / h2d
            dev.model()
            dev.residuals()
            for name, function in passes.items():
                if name in ("var_g", "expand") and dev.covariance is None:
                    continue
                # one repeat of the (slow, dense-partial) normal pass
                try:
                    seconds = timed(function, 1 if name == "normal" else args.repeats)
                except Exception as e:  # e.g. the extra passes' inputs beyond device memory
                    print(f"{kind:9s} {size:10d} {name:12s} skipped: {type(e).__name__}")
                    result["timings"].append({"layout": kind, "n_obs": size, "pass": name,
                                              "skipped": f"{type(e).__name__}: {e}"})
                    continue
                bound = moved[name] / rate
                row = {"layout": kind, "n_obs": size, "pass": name, "seconds": seconds,
                       "bound_seconds": bound, "ratio_to_bound": seconds / bound,
                       "bytes": moved[name], "batches": len(dev.target.batches),
                       "host_generation_seconds": t_host, "upload_seconds": t_upload}
                if name.startswith("column_entries"):  # which plan made them
                    row["plan"] = list(dev.entry_plans()[name])
                result["timings"].append(row)
                print(f"{kind:9s} {size:10d} {name:12s} {seconds * 1e3:10.3f} "
                      f"{bound * 1e3:10.3f} {seconds / bound:7.2f}")
            del dev, lay
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        if size > mixed_max:
            continue
        try:
            mix = MixedLayout(size)
        except Exception as e:  # e.g. out of device memory
            print(f"{'mixed':9s} {size:10d} skipped: {type(e).__name__}: {e}")
            result["timings"].append({"layout": "mixed", "n_obs": size,
                                      "skipped": f"{type(e).__name__}: {e}"})
            continue
        moved = mix.bytes_per_pass()
        for name, function in (("mixed_model", mix.model), ("mixed_split", mix.split),
                               ("mixed_evaluation", mix.evaluation)):
            seconds = timed(function, args.repeats)
            bound = moved[name] / rate
            result["timings"].append({"layout": "mixed", "n_obs": size, "pass": name,
                                      "seconds": seconds, "bound_seconds": bound,
                                      "ratio_to_bound": seconds / bound,
                                      "bytes": moved[name]})
            print(f"{'mixed':9s} {size:10d} {name:12s} {seconds * 1e3:10.3f} "
                  f"{bound * 1e3:10.3f} {seconds / bound:7.2f}")
        del mix
    result["all_checks_pass"] = bool(ok)
    result["total_seconds"] = time.perf_counter() - t_start
    print(f"all checks pass: {ok}; total {result['total_seconds']:.1f} s")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"JSON: {out_path}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
