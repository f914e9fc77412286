"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_statistics.py: the merging statistics of a
small anomalous simulation (a few sigma <= 0, a suggested resolution cut and the anomalous
table included) with the CC1/2 and CCanom sums on the CPU and on the device, and the job
table's transfer counts. Writes JSON to argv[1]; the test makes every assertion."""

import json
import sys

import dials_vmerge  # noqa: F401  (cctbx before numba)
import numpy as np
from numba import cuda

from merging_simulation import simulate

from dials_vmerge.backends import cuda_job_table, run_device
from dials_vmerge.merging.statistics import (
    cctbx_draws_needed, cctbx_uniform_stream, half_split_kernel, merging_statistics)
from dials_vmerge.merging.groups import Groupings

assert cuda.is_available(), "run with NUMBA_ENABLE_CUDASIM=1"


def statistics(sim, intensity, sigma, device):
    run_device._PASS_DEVICE[0] = device
    try:
        result = merging_statistics(sim.miller_index, intensity, sigma, sim.space_group,
                                    sim.unit_cell, n_bins=6, with_anomalous_table=True)
    finally:
        run_device._PASS_DEVICE[0] = "cpu"
    return result


def main(out_path):
    sim = simulate(seed=3, d_min=3.0, wilson_b=90.0, scale=200.0, n_batches=20,
                   cell=(40.0, 40.0, 50.0, 90, 90, 90))
    rng = np.random.default_rng(3)
    sigma = sim.sigma.copy()
    sigma[rng.random(len(sigma)) < 0.02] = 0.0
    intensity = sim.intensity + rng.normal(0, 3, len(sigma)) * sim.sigma
    out = {"n_obs": int(len(intensity))}
    cpu = statistics(sim, intensity, sigma, "cpu")
    cuda_job_table.new_job_table()
    # count the device shell sums and whether they found the deviation sums resident
    from dials_vmerge.backends import cuda_statistics

    calls = {"rmerge": 0, "rmerge_resident": 0, "cc_half": 0, "cc_anom": 0}
    originals = {name: getattr(cuda_statistics, name) for name in ("rmerge_sums", "cc_half",
                                                                     "cc_anom")}

    def rmerge_sums(prep, group_sel):
        kept = getattr(cuda_job_table.current_job_table(), "deviation_sums", None)
        calls["rmerge"] += 1
        calls["rmerge_resident"] += int(kept is not None and kept[0] is prep.abs_dev)
        return originals["rmerge_sums"](prep, group_sel)

    def counted(name):
        def call(*args):
            calls[name] += 1
            return originals[name](*args)
        return call

    cuda_statistics.rmerge_sums = rmerge_sums
    cuda_statistics.cc_half = counted("cc_half")
    cuda_statistics.cc_anom = counted("cc_anom")
    gpu = statistics(sim, intensity, sigma, "cuda")
    for name, original in originals.items():
        setattr(cuda_statistics, name, original)
    out["device_calls"] = calls
    out["cpu"] = cpu.as_dict()
    out["gpu"] = gpu.as_dict()
    out["cpu_table"] = cpu.format_table() + cpu.format_summary()
    out["gpu_table"] = gpu.format_table() + gpu.format_summary()
    out["transfers"] = cuda_job_table.current_job_table().summary()
    # the device half means themselves against half_split_kernel, every group of both
    # groupings (weighted and plain)
    from dials_vmerge.backends.cuda_statistics import _half_means
    from types import SimpleNamespace

    groupings = Groupings(sim.miller_index[sigma > 0], sim.space_group, sim.unit_cell)
    i_used, s_used = intensity[sigma > 0], sigma[sigma > 0]
    worst = 0.0
    for anomalous in (False, True):
        g = groupings.get(anomalous, sim.unit_cell)
        order = np.arange(g.n_groups, dtype=np.int64)
        uniforms = cctbx_uniform_stream(cctbx_draws_needed(g))
        prep = SimpleNamespace(intensity=i_used, sigma=s_used, uniforms=uniforms, groups=g,
                               anom=g)
        for weighted in (True, False):
            h1, h2 = half_split_kernel(i_used, s_used, g.permutation, g.group_start, order,
                                       uniforms, weighted)
            d1, d2 = (a.copy_to_host() for a in _half_means(prep, g, order, weighted))
            assert np.array_equal(np.isnan(h1), np.isnan(d1))
            ok = ~np.isnan(h1)
            for host, device in ((h1, d1), (h2, d2)):
                worst = max(worst, float(np.max(np.abs(device[ok] - host[ok])
                                                / np.abs(host[ok]))))
        out[f"n_split_groups_{anomalous}"] = int(ok.sum())
    out["half_means_max_rel"] = worst
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
