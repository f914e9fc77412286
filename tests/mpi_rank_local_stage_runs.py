"""Driver of tests/test_mpi_rank_local_em_imid.py, run under mpiexec (or alone: one process).

Every rank simulates the same data and runs dials.vmerge's job up to the scaling run
(pipeline.run_scaling_job with scale_table replaced by `staged` below). There each rank:

1. cuts ITS rows out of the prepared table: the rows whose non-anomalous key lies in its key
   range of the job's read-time partition (what the read-time partition gives a rank-local
   job: whole unique reflections, one-process row order), and builds a ScalingRun on them
   (the "local" run);
2. builds a ScalingRun on all rows (the "full" run, today's repeated path) and runs its first
   steps (outlier rejection, selection, LBFGS, expand, outlier rejection): realistic g and
   outlier flags;
3. copies each state's g and outlier flags row by row into the local run;
4. runs combine_intensities and then refine_error_models on the full run, and on the local
   run inside rank_local.rank_local_job(); and, as the negative checks, the candidate Imids
   from the rank's own test rows alone (np.mean, np.max) and the local run's error model
   outside the rank-local job (sums over the rank's rows only).

Writes <out>.<rank>.json: both runs' log lines of the two steps, per state Imid and (a, b)
as float.hex, the local-only candidates and error model, the rows held.
"""

import copy
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dials_vmerge  # noqa: F401,E402  (before numba)
from dials_vmerge.backends import mpi_world, rank_local  # noqa: E402
from dials_vmerge.backends.rank_partition import (active_partition,  # noqa: E402
                                                  non_anomalous_keys)
from dials_vmerge.io.expt import ExperimentList  # noqa: E402
from dials_vmerge.scaling import algorithm  # noqa: E402
from dials_vmerge.scaling import combine as comb  # noqa: E402
from dials_vmerge.simulate import simulate_rotation, simulate_stills  # noqa: E402

from test_error_model_calibration import ORTHORHOMBIC, vmerge_params  # noqa: E402

LOG = logging.getLogger("mpi_rank_local_stage_runs")


def hexes(values):
    return [float(v).hex() for v in values]


def local_rows(table, experiments):
    """This rank's rows of the prepared table (ascending) under the job's partition."""
    from dials_vmerge.geometry import space_group

    keys = non_anomalous_keys(table, space_group(experiments[0]))
    partition = active_partition()
    assert partition.n_ranks == mpi_world.n_ranks()
    return partition.rows_of_rank(keys, mpi_world.rank()).astype(np.int64)


def staged(experiments, table, dataset_rows, models, params, log=None):
    result = {"rank": mpi_world.rank(), "n_ranks": mpi_world.n_ranks()}
    mine = local_rows(table, experiments)
    result["rows"] = [int(mine.size), int(table.nrows)]
    position = np.full(table.nrows, -1, dtype=np.int64)
    position[mine] = np.arange(mine.size)
    my_dataset_rows = [position[r[position[r] >= 0]] for r in dataset_rows]
    local_log, full_log = [], []
    local = algorithm.ScalingRun(experiments, table.select(mine), my_dataset_rows,
                                 copy.deepcopy(models), params, local_log.append)
    full = algorithm.ScalingRun(experiments, table, dataset_rows, models, params,
                                full_log.append)
    assert len(local.states) == len(full.states), "a dataset without rows on this rank"
    full.initial_outlier_rejection()
    full.select_reflections()
    full.minimise("LBFGS")
    full.expand()
    full.outlier_rejection()
    for f, s in zip(full.states, local.states):
        at = np.searchsorted(f.suitable_rows, mine[s.suitable_rows])
        assert np.array_equal(f.suitable_rows[at], mine[s.suitable_rows])
        s.g = np.array(f.g[at])
        s.outlier = np.array(f.outlier[at])
        s.selected = np.array(f.selected[at])

    # the negative check of the candidates: the rank's own test rows alone
    seen = []
    choose = comb.choose_imid

    in_local = [False]  # the local run's calls (in one process: all rows, no rank-local job)

    def recording(datasets, *args, **kwargs):
        if in_local[0]:
            seen.append(comb.candidate_imids(np.concatenate([d["i_sum"] for d in datasets]),
                                             np.concatenate([d["partiality"] for d in datasets]))
                        if sum(d["i_sum"].size for d in datasets) else [])
        return choose(datasets, *args, **kwargs)

    candidates = []
    sorted_candidates = comb.candidate_imids_sorted

    def recording_candidates(*args, **kwargs):
        values = sorted_candidates(*args, **kwargs)
        if in_local[0]:
            candidates.append(values)
        return values

    comb.choose_imid = recording
    comb.candidate_imids_sorted = recording_candidates
    full_log.clear()
    full.combine_intensities()
    in_local[0] = True
    with rank_local.rank_local_job():
        local.combine_intensities()
    in_local[0] = False
    comb.choose_imid = choose
    comb.candidate_imids_sorted = sorted_candidates
    result["candidates"] = [hexes(c) for c in candidates]
    result["combine_full"] = list(full_log)
    result["combine_local"] = list(local_log)
    result["imid_full"] = hexes(s.imid for s in full.states)
    result["imid_local"] = hexes(s.imid for s in local.states)
    result["candidates_rank_only"] = [hexes(c) for c in seen]
    for f, s in zip(full.states, local.states):  # combined intensities row by row
        at = np.searchsorted(f.suitable_rows, mine[s.suitable_rows])
        assert np.array_equal(f.intensity[at], s.intensity)
        assert np.array_equal(f.variance[at], s.variance)
    full_log.clear()
    local_log.clear()
    full.refine_error_models()
    with rank_local.rank_local_job():
        local.refine_error_models()
    result["em_full"] = list(full_log)
    result["em_local"] = list(local_log)
    result["ab_full"] = [hexes([s.error_model.a, s.error_model.b]) for s in full.states]
    result["ab_local"] = [hexes([s.error_model.a, s.error_model.b]) for s in local.states]
    # the negative check of the error model: the local run's sums over its own rows only
    for s in local.states:
        s.error_model = algorithm.em.BasicErrorModel()
    local_log.clear()
    local.refine_error_models()
    result["em_rank_only"] = list(local_log)
    result["ab_rank_only"] = [hexes([s.error_model.a, s.error_model.b]) for s in local.states]
    with open(f"{sys.argv[1]}.{mpi_world.rank()}.json", "w") as out:
        json.dump(result, out)
    raise SystemExit(0)


def main():
    out, mode, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "rotation":
        experiments_dict, table, _ = simulate_rotation(
            n_obs_target=size, n_sweeps=2, model="physical", seed=seed, multiplicity=6.5,
            mean_i_over_sigma=10.0, error_model_a=1.3, error_model_b=0.03, **ORTHORHOMBIC)
    else:
        experiments_dict, table, _ = simulate_stills(
            n_stills=size, seed=seed, error_model_a=1.3, error_model_b=0.03,
            mean_i_over_sigma=10.0, **ORTHORHOMBIC)
    del out
    params = vmerge_params(*sys.argv[5:])
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    algorithm.scale_table = staged
    from dials_vmerge import pipeline

    # the job itself on the repeated path (every rank all rows): `staged` cuts the rank's
    # rows and enters the rank-local job itself, around the local run's steps only
    pipeline.RANK_LOCAL_OUTPUT_READY = False
    pipeline.run_scaling_job(params, experiments, table, LOG)
    raise AssertionError("staged() did not run")


if __name__ == "__main__":
    main()
