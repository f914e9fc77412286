"""The prepared GPU check: every CUDA kernel of the flat engine against its CPU twin, and each
kernel's time against the device bandwidth bound, on synthetic flat layouts.

Runs with numpy and numba (numba-cuda) alone: no cctbx. From the repository root:

    python benchmarks/gpu_check.py                      # 1e6, 1e7, 1e8 observations
    python benchmarks/gpu_check.py --out gpu_check.json
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --sizes 1e3 --check-size 1e3

Layouts (numpy, fixed seed): "kb" - KB stills, ~250 observations per still, one scale and one
B per still; "physical" - 4 sweeps with 3-parameter smoother runs for scale and decay and 8
spherical-harmonic absorption coefficients per observation. Observations are sorted by
group (mean multiplicity 8), as in the scaling engine.

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
import math
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
                                               merged_means_kernel)
from dials_vmerge.kernels.cuda import models as dm  # noqa: E402
from dials_vmerge.kernels.cuda.target import DeviceTarget  # noqa: E402

MEAN_MULTIPLICITY = 8
OBS_PER_STILL = 250
N_SWEEPS = 4
N_ABSORPTION = 8
TOLERANCE = 1e-10
MAX_DENSE_COVARIANCE = 8192


def _blocks(n):
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


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


# Layouts above this size are copies of one layout of this size (host generation time of a
# 1e8 physical layout would otherwise dominate the check): KB copies are new stills (their
# own K and B), physical copies add observations to the same sweeps.
BASE_SIZE = 10_000_000


def build_layout(kind, n):
    builder = {"kb": kb_layout, "physical": physical_layout}[kind]
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
                "absorption_coefficients", "absorption_first", "cols"):
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

    def model(self):
        if self.lay["kind"] == "kb":
            dm.kb_family_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.row_dataset, self.inv_two_d_sq, self.fixed, False, self.scale_value,
                self.decay_value, self.g, self.deriv)
        else:
            dm.physical_model_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.record, self.first_param, self.absorption, self.absorption_first, True,
                self.fixed, False, self.parameters, self.g, self.deriv)

    def model_g(self):
        if self.lay["kind"] == "kb":
            dm.kb_family_g_kernel[_blocks(self.n), THREADS_PER_BLOCK](
                self.row_dataset, self.inv_two_d_sq, self.fixed, False, self.scale_value,
                self.decay_value, self.g)
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

    def bytes_per_pass(self):
        """(read + written) bytes of each pass, counting every array element once."""
        n, k = self.n, self.n_slots
        used = int(np.count_nonzero(self.lay["cols"] >= 0))
        groups = 8 * (self.n_groups + 1)
        if self.lay["kind"] == "kb":
            model_in = n * 16
        else:
            model_in = n * (64 + 8 + 8 * N_ABSORPTION + 4)
        out = {
            "model": model_in + n * 8 * (1 + k),
            "model_g": model_in + n * 8,
            "residuals": n * 8 * 4 + groups,
            "gradient": used * 24,
            "var_g": n * 16 * k + n * 8,
            "merge": n * 16 + groups + 16 * self.n_groups,
        }
        out["evaluation"] = out["model"] + out["residuals"] + out["gradient"]
        return out


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(b), 1e-300)
    return float(np.max(np.abs(a - b) / scale))


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
    if lay["kind"] == "kb":
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
    dev.merge()
    grp = np.repeat(np.arange(dev.n_groups), np.diff(lay["group_start"]))
    s_w = np.bincount(grp, lay["weight"], minlength=dev.n_groups)
    s_wi = np.bincount(grp, lay["weight"] * lay["intensity"], minlength=dev.n_groups)
    out["merge"] = max(relative(dev.mean.copy_to_host(), s_wi / s_w),
                       relative(dev.sigma.copy_to_host(), np.sqrt(1.0 / s_w)))
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
    parser.add_argument("--layouts", default="kb,physical")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="JSON path (default $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args(argv)
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
    header = (f"{'layout':9s} {'n_obs':>10s} {'pass':12s} {'time ms':>10s} {'bound ms':>10s} "
              f"{'ratio':>7s}")
    print(header)
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        for kind in layouts:
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
                      "merge": dev.merge, "evaluation": dev.evaluation}
            moved = dev.bytes_per_pass()
            dev.model()
            dev.residuals()
            for name, function in passes.items():
                if name == "var_g" and dev.covariance is None:
                    continue
                seconds = timed(function, args.repeats)
                bound = moved[name] / rate
                row = {"layout": kind, "n_obs": size, "pass": name, "seconds": seconds,
                       "bound_seconds": bound, "ratio_to_bound": seconds / bound,
                       "bytes": moved[name], "batches": len(dev.target.batches),
                       "host_generation_seconds": t_host, "upload_seconds": t_upload}
                result["timings"].append(row)
                print(f"{kind:9s} {size:10d} {name:12s} {seconds * 1e3:10.3f} "
                      f"{bound * 1e3:10.3f} {seconds / bound:7.2f}")
            del dev, lay
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
