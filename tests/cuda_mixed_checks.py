"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_mixed_models.py: a job whose datasets form
several model families (KB, physical with absorption on two non-adjacent datasets, one of
them without a decay term, physical without absorption, array) evaluated by the device
families of backends/cuda_mixed_models.py against the CPU's scaling.family.ModelFamilies and
the CPU target / normal equations on the same rows. Both ways the device builds its inputs:
uploaded from the host's per-family layout of a table, and gathered on the device from each
family's resident job-order inputs (the table's rows split by family on the device). Writes
JSON (argv[1]); the test makes every assertion."""

import copy
import json
import sys

import dials_vmerge  # noqa: F401  (cctbx before numba)
import numpy as np
from numba import cuda

from dials_vmerge.backends import cuda_mixed_models as mm
from dials_vmerge.backends.cuda_job_table import DeviceJobTable
from dials_vmerge.backends.cuda_resident_inputs import _build_job_inputs
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.kernels.cuda.launch import THREADS_PER_BLOCK, blocks
from dials_vmerge.kernels.cuda.normal import DeviceNormalEquations
from dials_vmerge.kernels.cuda.target import DeviceTarget
from dials_vmerge.model.factory import create_scaling_model, default_model_params
from dials_vmerge.scaling.family import ModelFamilies
from dials_vmerge.scaling.parameters import ParameterManager
from dials_vmerge.scaling.target import normal_equations, target_and_gradient, variance_of_g
from dials_vmerge.simulate import simulate_rotation

assert cuda.is_available(), "run with NUMBA_ENABLE_CUDASIM=1"
RNG = np.random.default_rng(3)
ABSORPTION = {"physical__absorption_correction": True}
# dataset 4: the family of dataset 1 (the same absorption terms) without a decay term, so
# the family's models differ in their components (the guard's entries stand in for decay)
SETTINGS = [{"model": "KB"}, ABSORPTION, {"physical__absorption_correction": False},
            {"model": "array"}, {**ABSORPTION, "physical__decay_correction": False}]


def models_and_manager():
    experiments_dict, table, _ = simulate_rotation(n_obs_target=500, n_sweeps=len(SETTINGS),
                                                   model="physical", seed=5)
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    ids = np.asarray(table["id"])
    models = []
    for k, (expt, overrides) in enumerate(zip(experiments, SETTINGS)):
        sub = table.select((ids == k) & (np.asarray(table["d"]) > 0))
        sub["analytical_correction"] = RNG.uniform(0.9, 1.1, sub.nrows)
        model = create_scaling_model(default_model_params(**overrides), expt, sub)
        model.configure(sub, expt)
        p = model.parameter_vector()
        model.set_parameter_vector(p + RNG.normal(0.0, 0.05, p.size))
        models.append(model)
    manager = ParameterManager(models, 0)  # dataset 0's first parameter fixed
    manager.set_free(manager.get_free())
    return manager


def dense(values, cols, n_free):
    jacobian = np.zeros((values.shape[0], n_free))
    used = cols >= 0
    np.add.at(jacobian, (np.nonzero(used)[0], cols[used]), values[used])
    return jacobian


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


def table_of(manager, fraction):
    """A table's rows: a random subset of every dataset's rows (each family's rows
    interleaved with the others'), in a random order, grouped into random groups."""
    sizes = [m.n_configured for m in manager.models]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    job_rows = np.flatnonzero(RNG.random(offsets[-1]) < fraction)
    job_rows = RNG.permutation(job_rows)
    dataset_id = np.searchsorted(offsets, job_rows, side="right") - 1
    loc_index = job_rows - offsets[dataset_id]
    n = job_rows.size
    group_sizes = RNG.integers(1, 6, size=n)
    group_start = np.concatenate([[0], np.cumsum(group_sizes)])
    group_start = group_start[group_start < n]
    group_start = np.concatenate([group_start, [n]]).astype(np.int64)
    intensity = RNG.uniform(10.0, 1000.0, n)
    weight = RNG.uniform(0.01, 0.1, n)
    return offsets, job_rows, dataset_id, loc_index, group_start, intensity, weight


def compare(out, name, manager, mixed, dataset_id, loc_index, group_start, intensity, weight,
            with_normal=True):
    x = manager.get_free()
    n, n_par = dataset_id.size, manager.n_free
    g_cpu, values_cpu, cols_cpu = ModelFamilies(manager, dataset_id, loc_index).evaluate(x)
    g = cuda.device_array(n)
    deriv = cuda.device_array((n, mixed.width))
    mixed.prepare(deriv)
    mixed.evaluate(x, g, deriv)
    g_dev, deriv_dev = g.copy_to_host(), deriv.copy_to_host()
    cols_dev = mixed.cols.copy_to_host()
    j_cpu, j_dev = dense(values_cpu, cols_cpu, n_par), dense(deriv_dev, cols_dev, n_par)
    result = {"n_rows": int(n), "n_par": int(n_par), "width": int(mixed.width),
              "families": sorted(f.kind for f in mixed.families),
              "g_rel": float(np.max(np.abs(g_dev - g_cpu) / np.abs(g_cpu))),
              "jacobian_rel": rel(j_dev, j_cpu),
              "jacobian_columns_used": int(np.count_nonzero(np.abs(j_cpu).sum(axis=0))),
              "unused_slots_zero": bool(np.all(deriv_dev[cols_dev < 0] == 0.0))}
    if mixed.host_cols is not None:
        result["cols_equal_host"] = bool(np.array_equal(cols_dev, mixed.host_cols))
    # the target and gradient, the normal equations and var(g) over the combined table
    phi_cpu, grad_cpu = target_and_gradient(intensity, weight, g_cpu, values_cpu, cols_cpu,
                                            group_start, n_par)
    target = DeviceTarget(intensity, weight, group_start, cols_dev, n_par)
    phi_dev, grad_dev = target.evaluate(g, deriv)
    result["phi_rel"] = abs(phi_dev - phi_cpu) / abs(phi_cpu)
    result["grad_rel"] = rel(grad_dev, grad_cpu)
    if with_normal:
        _normal(result, manager, mixed, g, deriv, target, g_cpu, values_cpu, cols_cpu,
                group_start, intensity, weight, phi_cpu)
    m = RNG.normal(size=(n_par, n_par))
    covariance = m @ m.T / n_par
    var_cpu = variance_of_g(values_cpu, np.ascontiguousarray(cols_cpu, np.int64), covariance)
    var = cuda.device_array(n)
    device_models.variance_of_g_kernel[blocks(n), THREADS_PER_BLOCK](
        deriv, mixed.cols, cuda.to_device(covariance), var)
    result["var_rel"] = float(np.max(np.abs(var.copy_to_host() - var_cpu) / np.abs(var_cpu)))
    # g alone (the expansion's kernels)
    g_only = cuda.device_array(n)
    mixed.evaluate(x, g_only)
    result["g_only_equal"] = bool(np.array_equal(g_only.copy_to_host(), g_dev))
    out[name] = result


def _normal(result, manager, mixed, g, deriv, target, g_cpu, values_cpu, cols_cpu,
            group_start, intensity, weight, phi_cpu):
    n_par = manager.n_free
    _, rhs_cpu, normal_cpu = normal_equations(intensity, weight, g_cpu, values_cpu, cols_cpu,
                                              group_start, n_par)
    normal = DeviceNormalEquations(target.intensity, target.weight, group_start,
                                   cuda.to_device(group_start), mixed.cols, n_par)
    phi_n, rhs_dev, normal_dev = normal.evaluate(g, deriv)
    result["normal_phi_rel"] = abs(phi_n - phi_cpu) / abs(phi_cpu)
    result["rhs_rel"] = rel(rhs_dev, rhs_cpu)
    result["normal_rel"] = rel(normal_dev, normal_cpu)


def expansion_checks(manager):
    """g and var(g) of every configured row (backends/cuda_expand.py) against the CPU's
    evaluate_all_rows: with the families' job-order inputs resident (chunks of 300 rows,
    crossing datasets and families), and as in a streamed job (each chunk's per-family
    inputs built on the host and copied, nothing kept)."""
    from types import SimpleNamespace

    from dials_vmerge.backends import cuda_job_table
    from dials_vmerge.backends.cuda_expand import expand_on_device
    from dials_vmerge.scaling.family import evaluate_all_rows

    sizes = [m.n_configured for m in manager.models]
    n_par = manager.n_free
    m = RNG.normal(size=(n_par, n_par))
    covariance = m @ m.T / n_par
    g_cpu, var_cpu = evaluate_all_rows(manager, sizes, covariance, variance_of_g)
    g_only, _ = evaluate_all_rows(manager, sizes)
    out = {}
    for name, stream_rows in (("resident", None), ("streamed", 250)):
        store = cuda_job_table.new_job_table()
        store.stream_rows = stream_rows
        states = [SimpleNamespace(suitable_rows=np.arange(n)) for n in sizes]
        done = expand_on_device(states, manager, covariance, chunk_rows=300)
        g = np.concatenate([s.g for s in states])
        var = np.concatenate([s.var_g for s in states])
        states = [SimpleNamespace(suitable_rows=np.arange(n)) for n in sizes]
        expand_on_device(states, manager, None, chunk_rows=300)
        g_alone = np.concatenate([s.g for s in states])
        calls = store.summary()["expansion"]["calls"]
        out[name] = {"done": bool(done), "rows": int(g.size),
                     "g_rel": float(np.max(np.abs(g - g_cpu) / np.abs(g_cpu))),
                     "var_rel": float(np.max(np.abs(var - var_cpu) / np.abs(var_cpu))),
                     "g_alone_rel": float(np.max(np.abs(g_alone - g_only) / np.abs(g_only))),
                     "observation_bytes": [int(c["observation_bytes"]) for c in calls],
                     "uploaded": sorted({r for c in calls for r in c["uploaded"]})}
    cuda_job_table.release_job_table()
    return out


def main(out_path):
    manager = models_and_manager()
    out = {"plan": [[kind, d.tolist()] for kind, d in mm.family_plan(manager.models)],
           "applies": mm.applies(manager.models)}
    store = DeviceJobTable()
    offsets, job_rows, dataset_id, loc_index, gs, intensity, weight = table_of(manager, 0.6)
    # inputs of the table built on the host and uploaded
    host = mm.HostMixedLayout(manager, mm.family_plan(manager.models), dataset_id, loc_index)
    mixed = mm.device_from_host(host, manager, lambda name, a: store.put(a), store.put)
    compare(out, "host", manager, mixed, dataset_id, loc_index, gs, intensity, weight)
    # each family's job-order inputs resident, the table's rows split on the device
    job_host = _build_job_inputs("mixed", manager.models, manager.column_of_parameter,
                                 offsets)
    job = {k: (v if v is None or k.endswith("component_start") else cuda.to_device(v))
           for k, v in job_host.items()}
    order = cuda.to_device(job_rows.astype(np.int64))
    resident = mm.resident_families(store, manager, job, offsets, order, host)
    # (the normal equations read the same device arrays as the host case's: not repeated,
    # the simulator interprets their n_par^2 work per segment slowly)
    compare(out, "resident", manager, resident, dataset_id, loc_index, gs, intensity, weight,
            with_normal=False)
    # the device's split: each family's table rows in table order, as the host's
    out["resident"]["positions_equal_host"] = all(
        np.array_equal(f.positions.copy_to_host(), host.families[k][2])
        for k, f in enumerate(resident.families))
    # a host layout with other row counts (a table built otherwise): refused, not used
    other = mm.HostMixedLayout(manager, mm.family_plan(manager.models), dataset_id[1:],
                               loc_index[1:])
    out["resident_refuses_other_counts"] = mm.resident_families(
        store, manager, job, offsets, order, other) is None
    out["expansion"] = expansion_checks(manager)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
