"""Driver of tests/test_mpi_rank_local_em_imid.py's function-level runs (mpiexec or alone).

Every rank simulates the same rotation data and takes its rows of a key partition of the
rows in which one rank holds nothing (argv: out, n_ranks-independent seed, the rank that
holds nothing or -1, error-model filter "rotation" | "stills", optionally the error model's
minimisation: auto (the likelihood) | individual | regression). With g the simulation's true
scales, inside job_partition and rank_local_job, it runs combine.choose_imid (the joint
search) and error_model.refine_error_model on the friedel_pair_layout of its rows, and
writes <out>.<rank>.json: the Imid log lines, the chosen Imid and (a, b) as float.hex.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dials_vmerge  # noqa: F401,E402  (before numba)
from dials_vmerge.backends import mpi_world, rank_local  # noqa: E402
from dials_vmerge.backends.rank_partition import (RowPartition, job_partition,  # noqa: E402
                                                  packed_keys, partition_keys)
from dials_vmerge.scaling import combine as comb  # noqa: E402
from dials_vmerge.scaling import error_model as em  # noqa: E402
from dials_vmerge.scaling.ih_table import map_indices_to_asu  # noqa: E402
from dials_vmerge.simulate import simulate_rotation  # noqa: E402

from test_error_model_calibration import ORTHORHOMBIC  # noqa: E402


def main():
    out, seed, empty_rank, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    minimisation = sys.argv[5] if len(sys.argv) > 5 else "auto"
    size = int(float(sys.argv[6])) if len(sys.argv) > 6 else 20000
    experiments_dict, table, truth = simulate_rotation(
        n_obs_target=size, n_sweeps=2, model="physical", seed=seed, multiplicity=6.5,
        mean_i_over_sigma=10.0, error_model_a=1.3, error_model_b=0.03, **ORTHORHOMBIC)
    from dials_vmerge.geometry import space_group
    from dials_vmerge.io.expt import ExperimentList

    group = space_group(ExperimentList.from_dict(experiments_dict)[0])
    hkl = np.asarray(table["miller_index"])
    merged = map_indices_to_asu(hkl, group, False)
    anomalous = map_indices_to_asu(hkl, group, True)
    keys = packed_keys(merged)
    n_ranks, rank = mpi_world.n_ranks(), mpi_world.rank()
    partition = partition_keys(keys, n_ranks)
    if n_ranks > 1 and empty_rank >= 0:  # rank `empty_rank` owns no block
        blocks = partition.rank_blocks.copy()
        if empty_rank == n_ranks - 1:  # its blocks go to the rank before it
            blocks[empty_rank] = blocks[empty_rank + 1]
        else:  # to the rank after it
            blocks[empty_rank + 1] = blocks[empty_rank]
        partition = RowPartition(partition.block_keys, partition.block_observations, blocks)
    mine = partition.rows_of_rank(keys, rank)
    g = np.asarray(truth.inverse_scale_factor, dtype=float)[mine]
    p = np.asarray(table["partiality"], dtype=float)[mine] if "partiality" in table \
        else np.ones(mine.size)
    i_prf = np.asarray(table["intensity.prf.value"], dtype=float)[mine]
    v_prf = np.asarray(table["intensity.prf.variance"], dtype=float)[mine]
    i_sum = np.asarray(table["intensity.sum.value"], dtype=float)[mine]
    v_sum = np.asarray(table["intensity.sum.variance"], dtype=float)[mine]
    from dials_vmerge.scaling.prepare import prescaling_correction

    c = prescaling_correction(table)[mine]  # lp / qe, as preparation applies
    ok = (v_prf > 0) & (v_sum > 0) & (p > 0)
    pooled = {"asu_index": merged[mine][ok], "i_prf": i_prf[ok], "v_prf": v_prf[ok],
              "i_sum": i_sum[ok], "v_sum": v_sum[ok], "partiality": p[ok],
              "correction": c[ok], "g": g[ok]}
    log = []
    result = {"rank": rank, "n_ranks": n_ranks, "rows": int(mine.size)}
    with job_partition(partition), rank_local.rank_local_job():
        imid = comb.choose_imid([pooled], None, 1, log.append, by_key_blocks=True)
        intensity, variance = comb.combine_values(i_prf, v_prf, i_sum, v_sum, p, imid)
        intensity, variance = intensity * c, variance * c * c
        keep = variance > 0
        layout = em.friedel_pair_layout([anomalous[mine]], [merged[mine]],
                                        rows=[np.flatnonzero(keep)], full_sizes=[mine.size])
        extra = [p] if kind == "stills" else None
        table_em = em.unfiltered_table(None, [intensity], [variance], [g], extra, layout)
        import time

        wall, cpu = time.perf_counter(), time.process_time()
        before = dict(mpi_world.communication_stats())
        try:
            model = em.refine_error_model(
                None, [intensity], [variance], [g], None, None, 0.25, 25.0,
                minimisation=minimisation, stills=(2.0, 4) if kind == "stills" else None,
                ih_table=table_em)
            result["ab"] = [float(model.a).hex(), float(model.b).hex()]
        except em.ErrorModelError as e:
            result["ab"] = str(e)
        result["error_model_seconds"] = [time.perf_counter() - wall, time.process_time() - cpu]
        after = mpi_world.communication_stats()
        result["error_model_comm"] = {k: after[k] - before.get(k, 0) for k in after
                                      if isinstance(after[k], (int, float))}
    result["imid_log"] = log
    result["imid"] = float(imid).hex()
    with open(f"{out}.{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
