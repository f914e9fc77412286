#!/usr/bin/env python
"""The performance harness (docs: performance.md, "The benchmark harness").

For each size N, in one run on this machine:
  1. simulate a rotation dataset (physical truth, several sweeps, multiplicity ~6) and write it;
  2. the bandwidth bound: a numpy streaming reduction over as many bytes as one kernel pass
     reads (single thread, and split over all cores);
  3. one target+gradient evaluation of the scaling core (median of several) at nproc=1 and at
     all cores, via benchmarks/benchmark_hooks.py, and its ratio to the bound;
  4. the full `dials.vmerge` run end to end (subprocess) with its wall time and peak RSS;
  5. accuracy against the truth: RMS relative error of g after removing the overall scale,
     and the correlation of the merged intensities with the true ones.
Whatever is not available yet (the hooks, the program) is recorded as null with a note.

    python benchmarks/run.py --sizes 1e5,1e6 --out results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# Bytes per observation one pass streams when the kernel cannot tell us (performance.md:
# physical model, I, w, rotation coordinate, 1/d^2, two packed direction angles).
DEFAULT_BYTES_PER_OBS = 32
SIMULATION = dict(n_sweeps=4, multiplicity=6.0, model="physical", mean_i_over_sigma=10.0)
END_TO_END_TIMEOUT_S = 6 * 3600


def _log(message: str) -> None:
    print(message, flush=True)


def parse_sizes(text: str):
    return [int(float(v)) for v in text.split(",") if v.strip()]


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, first touch of memory
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# -- 2. bandwidth bound -------------------------------------------------------------------
def bandwidth_bound(n_bytes: int, repeats: int, threads: int) -> float:
    """Median time of np.add.reduce over an array of n_bytes (float64), split over threads."""
    data = np.ones(max(1, n_bytes // 8))
    if threads <= 1:
        return median_time(lambda: np.add.reduce(data), repeats)
    bounds = np.linspace(0, data.size, threads + 1).astype(np.int64)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        # numpy releases the GIL inside the reduction loop, so the slices stream concurrently
        def run():
            list(pool.map(lambda i: np.add.reduce(data[bounds[i]:bounds[i + 1]]), range(threads)))

        return median_time(run, repeats)
    finally:
        pool.shutdown()


# -- 3. kernel ----------------------------------------------------------------------------
def load_hooks():
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return importlib.import_module("benchmark_hooks"), None
    except Exception as e:  # broken: measure the rest
        return None, f"benchmarks/benchmark_hooks.py not importable ({type(e).__name__}: {e})"


def bytes_per_pass(hooks, evaluator, n_obs: int):
    counter = getattr(hooks, "bytes_read_per_pass", None)
    if counter is not None:
        try:
            return int(counter(evaluator)), "kernel"
        except Exception:
            pass
    if hasattr(evaluator, "bytes_read_per_pass"):
        value = evaluator.bytes_read_per_pass
        return int(value() if callable(value) else value), "kernel"
    return n_obs * DEFAULT_BYTES_PER_OBS, "default 32 B/obs"


def time_kernel(hooks, experiments, table, nproc: int, repeats: int):
    evaluator = hooks.make_target_evaluator(experiments, table, nproc)
    seconds = median_time(evaluator, repeats)
    return evaluator, seconds


# -- 4. end to end ------------------------------------------------------------------------
# The child writes its own VmHWM here at exit (see run_end_to_end).
PEAK_RSS_FILE = "dials.vmerge.vmhwm"
# VmHWM is in the `python -c` wrapper's finally block so that it is recorded on a normal
# return, on sys.exit and on an exception alike.
_CHILD_WRAPPER = """\
import sys
try:
    from dials_vmerge.command_line.vmerge import main
    sys.exit(main())
finally:
    try:
        with open("/proc/self/status") as status:
            hwm = next(line for line in status if line.startswith("VmHWM:"))
        with open({path!r}, "w") as out:
            out.write(str(int(hwm.split()[1]) * 1024))
    except (OSError, StopIteration):
        pass  # no /proc (not Linux): the harness falls back to wait4's ru_maxrss
"""


def read_child_peak_rss(path: str):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def run_end_to_end(directory: str, expt: str, refl: str, extra_args=()):
    """Run dials.vmerge in `directory` (with PHIL arguments extra_args); (seconds, peak RSS
    bytes, peak RSS source, returncode, stderr tail)."""
    peak_path = os.path.join(os.path.abspath(directory), PEAK_RSS_FILE)
    if os.path.exists(peak_path):
        os.remove(peak_path)
    command = [sys.executable, "-c", _CHILD_WRAPPER.format(path=peak_path), expt, refl,
               *extra_args]
    stderr_path = os.path.join(directory, "dials.vmerge.stderr")
    with open(stderr_path, "wb") as err, open(os.path.join(directory, "dials.vmerge.stdout"), "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=directory, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    # The child's own VmHWM, not wait4's ru_maxrss: on Linux the child is forked from this
    # process and the high-water RSS of its pre-exec copy of the harness (which holds the
    # simulated data) counts towards ru_maxrss, which over-reported the peak (1e6 run: 1027
    # B/obs against 864 from /usr/bin/time -v). exec resets VmHWM, so it covers dials.vmerge
    # only. ru_maxrss is the fallback only where /proc is missing (KiB, but bytes on macOS).
    peak = read_child_peak_rss(peak_path)
    source = "child VmHWM"
    if peak is None:
        unit = 1 if sys.platform == "darwin" else 1024
        peak, source = usage.ru_maxrss * unit, "wait4 ru_maxrss (includes the pre-exec fork)"
    with open(stderr_path, "rb") as f:
        tail = f.read().decode(errors="replace").strip().splitlines()
    return seconds, peak, source, proc.returncode, (tail[-1] if tail else "")


# -- 5. accuracy --------------------------------------------------------------------------
def _keys(index: np.ndarray) -> np.ndarray:
    index = index.astype(np.int64) + 2048
    return (index[:, 0] * 4096 + index[:, 1]) * 4096 + index[:, 2]


def _asu(index, symmetry):
    """Non-anomalous cctbx ASU indices (the truth file's convention)."""
    from cctbx import miller
    from cctbx.array_family import flex

    h = np.ascontiguousarray(index, dtype=np.int32)
    flex_index = flex.miller_index(*(flex.int(np.ascontiguousarray(h[:, i])) for i in range(3)))
    miller.map_to_asu(symmetry.space_group().type(), False, flex_index)
    return flex_index.as_vec3_double().as_double().as_numpy_array().reshape(-1, 3).astype(np.int64)


def scale_rms_rel_error(g_est: np.ndarray, g_true: np.ndarray) -> float:
    """RMS of g_est / g_true - 1 after dividing out the geometric-mean ratio (overall scale)."""
    ratio = g_est / g_true
    ratio = ratio / np.exp(np.mean(np.log(ratio)))
    return float(np.sqrt(np.mean((ratio - 1.0) ** 2)))


def scale_rms_rel_error_k_b(g_est: np.ndarray, g_true: np.ndarray, d: np.ndarray) -> float:
    """RMS relative error of g after removing an overall K exp(B / 2d^2): one global B is
    degenerate with the merged intensities (scaling only holds it through restraints), so
    the overall-scale-only figure mostly measures that trend, not the scales' quality."""
    log_ratio = np.log(g_est / g_true)
    design = np.column_stack([np.ones_like(d), 1.0 / (2.0 * d * d)])
    coef, *_ = np.linalg.lstsq(design, log_ratio, rcond=None)
    residual = np.exp(log_ratio - design @ coef)
    return float(np.sqrt(np.mean((residual - 1.0) ** 2)))


def merged_cc(index, intensity, truth_index, truth_intensity, symmetry) -> float:
    asu = _asu(index, symmetry)
    common, a, b = np.intersect1d(_keys(asu), _keys(truth_index), return_indices=True)
    if len(common) < 3:
        return float("nan")
    return float(np.corrcoef(intensity[a], truth_intensity[b])[0, 1])


def input_rows(table, input_ids):
    """Rows of the simulated input behind each scaled row: original_index is the row in the
    per-dataset table (dials-scaling.md section 3), so it is mapped through the input rows of
    that dataset's id. Without the input ids it is taken as a row of the whole input."""
    local = table["original_index"].astype(np.int64)
    if input_ids is None or "id" not in table:
        return local
    # input rows sorted by id (stable): dataset k's rows start at first[k]
    input_ids = np.asarray(input_ids, dtype=np.int64)
    order = np.argsort(input_ids, kind="stable")
    ids, first = np.unique(input_ids[order], return_index=True)
    position = np.searchsorted(ids, np.asarray(table["id"], dtype=np.int64))
    return order[first[position] + local]


def accuracy(directory: str, truth, symmetry, input_ids=None):
    """(scale_rms_rel_error, merged_cc_to_truth, merged_source, notes) from the run's outputs.

    input_ids: the `id` column of the simulated input (maps per-dataset original_index)."""
    from dials_vmerge import flags
    from dials_vmerge.io import read_reflections

    notes = []
    rms = cc = None
    source = None
    accuracy.rms_k_b = None
    scaled_path = os.path.join(directory, "scaled.refl")
    if not os.path.exists(scaled_path):
        return None, None, None, ["no scaled.refl written"]
    table = read_reflections(scaled_path)
    scaled = (table["flags"] & np.uint64(flags.scaled)) != 0
    if "original_index" in table:
        rows = input_rows(table, input_ids)
    elif table.nrows == len(truth.inverse_scale_factor):
        rows = np.arange(table.nrows)
    else:
        rows = None
        notes.append("scaled.refl has no original_index: scale error not computed")
    if rows is not None and scaled.any() and "inverse_scale_factor" in table:
        rms = scale_rms_rel_error(table["inverse_scale_factor"][scaled],
                                  truth.inverse_scale_factor[rows[scaled]])
        accuracy.rms_k_b = scale_rms_rel_error_k_b(table["inverse_scale_factor"][scaled],
                                                   truth.inverse_scale_factor[rows[scaled]],
                                                   table["d"][scaled])
    mtz_path = os.path.join(directory, "merged.mtz")
    if os.path.exists(mtz_path):
        try:
            from iotbx import mtz

            arrays = {a.info().label_string(): a for a in mtz.object(mtz_path).as_miller_arrays()}
            imean = next((a for label, a in arrays.items() if label.startswith("IMEAN")), None)
            if imean is not None:
                cc = merged_cc(np.array(imean.indices()), np.array(imean.data()),
                               truth.miller_index, truth.intensity, symmetry)
                source = "merged.mtz IMEAN"
        except Exception as e:
            notes.append(f"merged.mtz unreadable ({type(e).__name__})")
    if cc is None and scaled.any() and "intensity.scale.value" in table:
        # inverse-variance mean of I/g per unique reflection, from the scaled table itself
        g = table["inverse_scale_factor"][scaled]
        value = table["intensity.scale.value"][scaled] / g
        weight = g * g / table["intensity.scale.variance"][scaled]
        asu = _asu(table["miller_index"][scaled], symmetry)
        keys, group = np.unique(_keys(asu), return_inverse=True)
        merged = np.bincount(group, weight * value) / np.bincount(group, weight)
        first = np.zeros(len(keys), dtype=np.int64)
        first[group[::-1]] = np.arange(len(group))[::-1]
        cc = merged_cc(asu[first], merged, truth.miller_index, truth.intensity, symmetry)
        source = "scaled.refl (inverse-variance mean)"
    return rms, cc, source, notes


# -- the run ------------------------------------------------------------------------------
def run_size(n_target: int, workdir: str, repeats: int, seed: int, hooks, hooks_note):
    from cctbx import crystal

    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.simulate import simulate_rotation, write_outputs

    rec = {"n_obs_target": n_target, "notes": []}
    start = time.perf_counter()
    experiments_dict, table, truth = simulate_rotation(n_obs_target=n_target, seed=seed, **SIMULATION)
    rec["simulate_seconds"] = time.perf_counter() - start
    n = table.nrows
    rec["n_obs"] = n
    rec["n_experiments"] = len(experiments_dict["experiment"])
    rec["multiplicity"] = n / max(len(np.unique(truth.unique_index)), 1)
    directory = os.path.join(workdir, f"n{n_target}")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    start = time.perf_counter()
    write_outputs(experiments_dict, table, truth, os.path.join(directory, "simulated.expt"),
                  os.path.join(directory, "simulated.refl"), os.path.join(directory, "truth.h5"))
    rec["write_seconds"] = time.perf_counter() - start
    rec["refl_file_bytes_per_obs"] = os.path.getsize(os.path.join(directory, "simulated.refl")) / n
    symmetry = crystal.symmetry(unit_cell=truth.structure.unit_cell,
                                space_group=truth.structure.space_group)

    cores = all_cores()
    rec["nproc_all"] = cores
    n_bytes, bytes_source = n * DEFAULT_BYTES_PER_OBS, "default 32 B/obs"
    for key in ("eval_seconds", "eval_seconds_all_cores"):
        rec[key] = None
    if hooks is not None:
        try:
            experiments = ExperimentList.from_dict(experiments_dict)
            evaluator, rec["eval_seconds"] = time_kernel(hooks, experiments, table, 1, repeats)
            n_bytes, bytes_source = bytes_per_pass(hooks, evaluator, n)
            del evaluator
            _, rec["eval_seconds_all_cores"] = time_kernel(hooks, experiments, table, cores, repeats)
        except Exception as e:
            rec["notes"].append(f"kernel evaluation failed ({type(e).__name__}: {e})")
    else:
        rec["notes"].append(hooks_note)
    rec["bytes_per_pass"] = n_bytes
    rec["bytes_per_obs_per_pass"] = n_bytes / n
    rec["bytes_per_pass_source"] = bytes_source
    rec["bound_seconds"] = bandwidth_bound(n_bytes, repeats, 1)
    rec["bound_seconds_all_cores"] = bandwidth_bound(n_bytes, repeats, cores)
    rec["ratio_to_bound"] = (rec["eval_seconds"] / rec["bound_seconds"]
                             if rec["eval_seconds"] is not None else None)
    rec["ratio_to_bound_all_cores"] = (
        rec["eval_seconds_all_cores"] / rec["bound_seconds_all_cores"]
        if rec["eval_seconds_all_cores"] is not None else None)
    input_ids = np.array(table["id"])
    del table, experiments_dict

    seconds, peak, peak_source, code, tail = run_end_to_end(directory, "simulated.expt",
                                                            "simulated.refl")
    rec["end_to_end_returncode"] = code
    for key in ("end_to_end_seconds", "end_to_end_us_per_obs", "peak_rss_bytes",
                "peak_rss_bytes_per_obs", "scale_rms_rel_error", "merged_cc_to_truth",
                "merged_source", "scale_rms_rel_error_after_k_b"):
        rec[key] = None
    if code == 0:
        rec["end_to_end_seconds"] = seconds
        rec["end_to_end_us_per_obs"] = seconds / n * 1e6
        rec["peak_rss_bytes"] = peak
        rec["peak_rss_bytes_per_obs"] = peak / n
        rec["peak_rss_source"] = peak_source
        rms, cc, source, notes = accuracy(directory, truth, symmetry, input_ids)
        rec["scale_rms_rel_error"], rec["merged_cc_to_truth"], rec["merged_source"] = rms, cc, source
        rec["scale_rms_rel_error_after_k_b"] = accuracy.rms_k_b
        rec["notes"].extend(notes)
    else:
        rec["notes"].append(f"dials.vmerge exited {code}: {tail}")
    return rec


def run_kernel_only(n_target: int, repeats: int, seed: int, hooks):
    """performance.md's optional 1e8 point: no files and no end-to-end run. A 1e6 simulation
    is configured once and its per-observation pass inputs are tiled (as more unique
    reflections) up to n_target, so the pass streams n_target real observation records."""
    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.simulate import simulate_rotation

    rec = {"n_obs_target": n_target, "kernel_only": True, "notes": ["kernel only (tiled 1e6 simulation)"]}
    base_n = min(n_target, 1_000_000)
    experiments_dict, table, _ = simulate_rotation(n_obs_target=base_n, seed=seed, **SIMULATION)
    experiments = ExperimentList.from_dict(experiments_dict)
    base = hooks.make_target_evaluator(experiments, table, 1)
    del table, experiments_dict
    copies = max(1, int(round(n_target / base.n_obs)))
    cores = all_cores()
    rec["nproc_all"] = cores
    evaluator = hooks.tile_evaluator(base, copies, nproc=1)
    del base
    n = evaluator.n_obs
    rec["n_obs"] = n
    rec["eval_seconds"] = median_time(evaluator, repeats)
    evaluator.set_nproc(cores)
    rec["eval_seconds_all_cores"] = median_time(evaluator, repeats)
    n_bytes = int(hooks.bytes_read_per_pass(evaluator))
    del evaluator
    rec["bytes_per_pass"] = n_bytes
    rec["bytes_per_obs_per_pass"] = n_bytes / n
    rec["bytes_per_pass_source"] = "kernel"
    rec["bound_seconds"] = bandwidth_bound(n_bytes, repeats, 1)
    rec["bound_seconds_all_cores"] = bandwidth_bound(n_bytes, repeats, cores)
    rec["ratio_to_bound"] = rec["eval_seconds"] / rec["bound_seconds"]
    rec["ratio_to_bound_all_cores"] = rec["eval_seconds_all_cores"] / rec["bound_seconds_all_cores"]
    for key in ("end_to_end_seconds", "end_to_end_us_per_obs", "peak_rss_bytes",
                "peak_rss_bytes_per_obs", "scale_rms_rel_error", "merged_cc_to_truth",
                "scale_rms_rel_error_after_k_b"):
        rec[key] = None
    return rec


def memory_allows(n_obs: int, bytes_per_obs: int = 120) -> bool:
    """True if MemAvailable covers the tiled pass inputs (72 B/obs record) with room to spare."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0) > n_obs * bytes_per_obs
    except OSError:
        return False


def _fmt(value, spec):
    if value is None:
        # the width is the spec's leading digits ("9.4f" and "9d" alike)
        return "null".rjust(int("".join(ch for ch in spec.split(".")[0] if ch.isdigit())))
    return format(value, spec)


def print_table(records):
    header = (f"{'N obs':>10} {'eval 1c s':>10} {'eval all s':>10} {'bound s':>9} {'ratio':>7} "
              f"{'ratio all':>9} {'e2e s':>8} {'us/obs':>7} {'RSS B/obs':>9} {'g rms':>7} {'g rms KB':>8} {'CC':>7}")
    _log(header)
    _log("-" * len(header))
    for r in records:
        _log(f"{r['n_obs']:>10d} {_fmt(r['eval_seconds'], '10.4f')} "
             f"{_fmt(r['eval_seconds_all_cores'], '10.4f')} {_fmt(r['bound_seconds'], '9.5f')} "
             f"{_fmt(r['ratio_to_bound'], '7.2f')} {_fmt(r['ratio_to_bound_all_cores'], '9.2f')} "
             f"{_fmt(r['end_to_end_seconds'], '8.2f')} {_fmt(r['end_to_end_us_per_obs'], '7.2f')} "
             f"{_fmt(r['peak_rss_bytes_per_obs'], '9.0f')} {_fmt(r['scale_rms_rel_error'], '7.4f')} "
             f"{_fmt(r.get('scale_rms_rel_error_after_k_b'), '8.4f')} "
             f"{_fmt(r['merged_cc_to_truth'], '7.4f')}")
        for note in r["notes"]:
            _log(f"{'':>10} note: {note}")


# -- many-dataset series (issue 10) ---------------------------------------------------------
def run_series_point(kind: str, workdir: str, seed: int, n_stills=None, n_wedges=None,
                     obs_per_wedge=None, n_obs_sweep=None, model=None):
    """Simulate, write and run dials.vmerge end to end on one many-dataset point:
    kind "stills" (n_stills KB stills, the defaults of `dials.vmerge.simulate mode=stills
    model=KB`), "wedges" (n_wedges narrow physical sweeps, ~obs_per_wedge each) or
    "sweep" (one physical sweep of n_obs_sweep observations, the wedges' reference).
    model: the scaling model dials.vmerge is asked for (None: its default, which is KB for
    wedges this narrow, as in DIALS)."""
    from cctbx import crystal

    from dials_vmerge.simulate import simulate_rotation, simulate_stills, write_outputs

    rec = {"series": kind, "notes": []}
    start = time.perf_counter()
    if kind == "stills":
        experiments_dict, table, truth = simulate_stills(n_stills=n_stills, seed=seed, model="KB")
        label = f"stills{n_stills}"
    elif kind == "wedges":
        experiments_dict, table, truth = simulate_rotation(
            n_obs_target=n_wedges * obs_per_wedge, n_sweeps=n_wedges, model="physical",
            seed=seed, mean_i_over_sigma=10.0)  # multiplicity 6 over all wedges: each ~1 degree
        label = f"wedges{n_wedges}x{obs_per_wedge}" + (f"-{model}" if model else "")
    else:
        experiments_dict, table, truth = simulate_rotation(
            n_obs_target=n_obs_sweep, n_sweeps=1, model="physical", seed=seed,
            mean_i_over_sigma=10.0)
        label = f"sweep{n_obs_sweep}" + (f"-{model}" if model else "")
    rec["simulate_seconds"] = time.perf_counter() - start
    rec["label"] = label
    rec["n_obs"] = table.nrows
    rec["n_experiments"] = len(experiments_dict["experiment"])
    directory = os.path.join(workdir, label)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    write_outputs(experiments_dict, table, truth, os.path.join(directory, "simulated.expt"),
                  os.path.join(directory, "simulated.refl"), os.path.join(directory, "truth.h5"))
    symmetry = crystal.symmetry(unit_cell=truth.structure.unit_cell,
                                space_group=truth.structure.space_group)
    input_ids = np.array(table["id"])
    del table, experiments_dict
    seconds, peak, _, code, tail = run_end_to_end(directory, "simulated.expt", "simulated.refl",
                                                  [f"model={model}"] if model else [])
    rec["end_to_end_returncode"] = code
    rec.update(end_to_end_seconds=None, peak_rss_bytes_per_obs=None, scale_rms_rel_error=None,
               scale_rms_rel_error_after_k_b=None, log_lines=None)
    if code == 0:
        rec["end_to_end_seconds"] = seconds
        rec["peak_rss_bytes"] = peak
        rec["peak_rss_bytes_per_obs"] = peak / rec["n_obs"]
        rms, _, _, notes = accuracy(directory, truth, symmetry, input_ids)
        rec["scale_rms_rel_error"] = rms
        rec["scale_rms_rel_error_after_k_b"] = accuracy.rms_k_b
        rec["notes"].extend(notes)
        log_path = os.path.join(directory, "dials.vmerge.log")
        if os.path.exists(log_path):
            with open(log_path) as f:
                rec["log_lines"] = sum(1 for _ in f)
    else:
        rec["notes"].append(f"dials.vmerge exited {code}: {tail}")
    return rec


def parse_wedges(text: str):
    """"200x5000,50x5000" -> [(200, 5000), (50, 5000)]."""
    out = []
    for item in text.split(","):
        if item.strip():
            count, size = item.lower().split("x")
            out.append((int(float(count)), int(float(size))))
    return out


def print_series_table(records):
    header = (f"{'point':>16} {'datasets':>8} {'N obs':>9} {'e2e s':>7} {'RSS B/obs':>9} "
              f"{'g rms K,B':>9} {'log lines':>9}")
    _log(header)
    _log("-" * len(header))
    for r in records:
        _log(f"{r['label']:>16} {r['n_experiments']:>8d} {r['n_obs']:>9d} "
             f"{_fmt(r['end_to_end_seconds'], '7.2f')} {_fmt(r['peak_rss_bytes_per_obs'], '9.0f')} "
             f"{_fmt(r['scale_rms_rel_error_after_k_b'], '9.4f')} {_fmt(r['log_lines'], '9d')}")
        for note in r["notes"]:
            _log(f"{'':>16} note: {note}")


def series_ratios(records):
    """Issue 10's figures of merit: time(largest stills)/time(smallest) per size ratio, and
    each wedge point's time over the one sweep of the same total size."""
    out = {}
    stills = sorted((r for r in records if r["series"] == "stills" and r["end_to_end_seconds"]),
                    key=lambda r: r["n_experiments"])
    if len(stills) >= 2:
        small, large = stills[0], stills[-1]
        out["stills_time_ratio"] = large["end_to_end_seconds"] / small["end_to_end_seconds"]
        out["stills_size_ratio"] = large["n_experiments"] / small["n_experiments"]
    sweeps = {r["label"]: r for r in records if r["series"] == "sweep"}
    for r in records:
        if r["series"] == "wedges" and r["end_to_end_seconds"]:
            sweep = sweeps.get(r.get("reference"))
            if sweep and sweep["end_to_end_seconds"]:
                out[f"{r['label']}_over_one_sweep"] = (r["end_to_end_seconds"]
                                                       / sweep["end_to_end_seconds"])
    return out


def run_series(args) -> int:
    workdir = args.workdir or tempfile.mkdtemp(prefix="vmerge_series_")
    os.makedirs(workdir, exist_ok=True)
    records = []

    def save():
        with open(args.out, "w") as f:
            json.dump({"machine": {"cores": all_cores()}, "records": records,
                       "ratios": series_ratios(records)}, f, indent=2)

    try:
        for n in parse_sizes(args.stills):
            _log(f"== {n} stills")
            records.append(run_series_point("stills", workdir, args.seed, n_stills=n))
            save()
        for count, size in parse_wedges(args.wedges):
            _log(f"== {count} wedges x {size}")
            wedges = run_series_point("wedges", workdir, args.seed, n_wedges=count,
                                      obs_per_wedge=size, model=args.wedge_model)
            records.append(wedges)
            _log(f"== one sweep of {wedges['n_obs']} observations")
            sweep = run_series_point("sweep", workdir, args.seed, n_obs_sweep=wedges["n_obs"],
                                     model=args.wedge_model)
            wedges["reference"] = sweep["label"]
            records.append(sweep)
            save()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_series_table(records)
    for key, value in series_ratios(records).items():
        _log(f"{key}: {value:.3f}")
    _log(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated N (observations)")
    parser.add_argument("--out", default="bench_results.json", help="JSON records")
    # 21, not 5: on this shared 2-core VM medians of 5 ~15 ms passes scattered from 7 to 12 ms
    # at 2 threads (40-call medians: 6.6-7.5 ms, 1 thread 14.5-14.7 ms)
    parser.add_argument("--repeats", type=int, default=21, help="timings per median")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kernel-only-sizes", default="",
                        help="comma-separated N for the kernel-only point (e.g. 1e8), run where memory allows")
    parser.add_argument("--workdir", default=None,
                        help="where simulated files and dials.vmerge outputs go (default: temporary)")
    parser.add_argument("--stills", default="",
                        help="many-dataset series: comma-separated numbers of KB stills, e.g. "
                             "500,2000 (with --wedges, instead of the --sizes runs)")
    parser.add_argument("--wedges", default="",
                        help="many-dataset series: COUNTxOBS narrow physical wedges, e.g. "
                             "200x5000, each compared with one sweep of the same total size")
    parser.add_argument("--wedge-model", default=None,
                        help="scaling model for the wedges and their one-sweep reference, e.g. "
                             "physical (default: dials.vmerge's own choice, KB for narrow "
                             "wedges)")
    # issue 11: MPI series (benchmarks/mpi_scaling.py)
    parser.add_argument("--mpi", default="", help="MPI series: comma-separated rank counts, e.g. 1,2")
    parser.add_argument("--mpi-rotation-obs", default="2e5", help="MPI series: rotation size")
    parser.add_argument("--mpi-stills", type=int, default=2000, help="MPI series: number of stills")
    args = parser.parse_args(argv)
    if args.mpi:
        from mpi_scaling import run_mpi_benchmark

        run_mpi_benchmark(parse_sizes(args.mpi), int(float(args.mpi_rotation_obs)),
                          args.mpi_stills, args.workdir, args.out, args.seed)
        _log(f"wrote {args.out}")
        return 0
    if args.stills or args.wedges:
        return run_series(args)
    sizes = parse_sizes(args.sizes)
    hooks, hooks_note = load_hooks()
    workdir = args.workdir or tempfile.mkdtemp(prefix="vmerge_bench_")
    os.makedirs(workdir, exist_ok=True)
    records = []
    try:
        for n in sizes:
            _log(f"== N = {n:g}")
            records.append(run_size(n, workdir, args.repeats, args.seed, hooks, hooks_note))
            with open(args.out, "w") as f:  # partial results survive a later failure
                json.dump({"machine": {"cores": all_cores()}, "records": records}, f, indent=2)
        for n in parse_sizes(args.kernel_only_sizes):
            if hooks is None:
                _log(f"== N = {n:g} kernel only: skipped ({hooks_note})")
                continue
            if not memory_allows(n):
                _log(f"== N = {n:g} kernel only: skipped (not enough free memory)")
                continue
            _log(f"== N = {n:g} (kernel only)")
            records.append(run_kernel_only(n, args.repeats, args.seed, hooks))
            with open(args.out, "w") as f:
                json.dump({"machine": {"cores": all_cores()}, "records": records}, f, indent=2)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(records)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
