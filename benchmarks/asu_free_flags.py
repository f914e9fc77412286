#!/usr/bin/env python
"""Issue 10 (one 1e6 sweep in 6 s): the per-reflection cctbx work replaced in session 7,
timed in one process against the code it replaced, on a real job's Miller indices.

- ASU mapping: cctbx's map_to_asu of every row (merging.groups.asu_chunks, as before)
  against one mapping per symmetry orbit (asu_mapping.asu_indices_by_orbit), anomalous and
  not; the results must be equal.
- Free flags: cctbx's generate_r_free_flags (lattice symmetry, the draws vectorised as
  before) against mtz.free_r_flags (the same recipe on the lattice orbits), on the job's
  unique Friedel-merged ASU indices; equal flags.

CPU seconds (time.process_time; one thread) and wall seconds, best of --repeats.

    python benchmarks/asu_free_flags.py simulated.expt simulated.refl --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import dials_vmerge  # noqa: F401  (cctbx before numba)
import numpy as np


def best_of(repeats, function):
    best_cpu, best_wall, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = function()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expt")
    parser.add_argument("refl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    from cctbx import crystal, miller

    from dials_vmerge.asu_mapping import asu_indices_by_orbit
    from dials_vmerge.geometry import space_group, unit_cell
    from dials_vmerge.io import read_experiments, read_reflections
    from dials_vmerge.merging.groups import asu_chunks, flex_indices
    from dials_vmerge.mtz import _vectorised_ccp4_draws, free_r_flags

    numba_threads = os.environ.get("NUMBA_NUM_THREADS")
    experiments = read_experiments(args.expt)
    hkl = np.ascontiguousarray(
        np.asarray(read_reflections(args.refl).peek("miller_index")).reshape(-1, 3))
    group, cell = space_group(experiments[0]), unit_cell(experiments[0])

    def rows(anomalous):
        out = np.empty((len(hkl), 3), np.int32)
        for start, stop, asu, _ in asu_chunks(hkl, group, anomalous):
            out[start:stop] = asu
        return out

    asu_indices_by_orbit(hkl[:1 << 15], group, True)  # load the kernels once
    lines, results = [], {"benchmark": "asu_free_flags", "inputs": [args.expt, args.refl],
                          "observations": int(len(hkl)), "space_group": str(group.info()),
                          "machine": platform.node(), "cpu_count": os.cpu_count(),
                          "load_average_1min_before": os.getloadavg()[0],
                          "numba_threads": numba_threads, "points": []}
    merged = None
    for anomalous in (False, True):
        before = best_of(args.repeats, lambda: rows(anomalous))
        after = best_of(args.repeats, lambda: asu_indices_by_orbit(hkl, group, anomalous))
        equal = bool(np.array_equal(before[2], after[2]))
        if not anomalous:
            merged = np.unique(after[2], axis=0)
        results["points"].append({"step": f"ASU mapping, anomalous={anomalous}",
                                  "cpu_before_s": before[0], "cpu_after_s": after[0],
                                  "wall_before_s": before[1], "wall_after_s": after[1],
                                  "equal": equal})

    symmetry = crystal.symmetry(unit_cell=cell, space_group=group,
                                assert_is_compatible_unit_cell=False)

    def cctbx_flags():
        unique = miller.set(symmetry, flex_indices(merged), anomalous_flag=False)
        state = random.getstate()
        try:
            random.seed(0)
            with _vectorised_ccp4_draws():
                flags = unique.generate_r_free_flags(fraction=0.05, max_free=None,
                                                     format="ccp4")
        finally:
            random.setstate(state)
        return flags.data().as_numpy_array()

    before = best_of(args.repeats, cctbx_flags)
    after = best_of(args.repeats, lambda: free_r_flags(merged, group, cell, seed=0))
    results["points"].append({"step": f"free flags, {len(merged)} reflections",
                              "cpu_before_s": before[0], "cpu_after_s": after[0],
                              "wall_before_s": before[1], "wall_after_s": after[1],
                              "equal": bool(np.array_equal(before[2], after[2]))})

    lines.append(f"{len(hkl)} observations, {group.info()}, load average "
                 f"{results['load_average_1min_before']:.1f} before")
    lines.append("| step | CPU before | CPU after | wall before | wall after | equal |")
    lines.append("|---|---|---|---|---|---|")
    for p in results["points"]:
        lines.append(f"| {p['step']} | {p['cpu_before_s']:.3f} s | {p['cpu_after_s']:.3f} s | "
                     f"{p['wall_before_s']:.3f} s | {p['wall_after_s']:.3f} s | {p['equal']} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if not all(p["equal"] for p in results["points"]):
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()
