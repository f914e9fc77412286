"""Cross-validation of scaling options (dials.scale `cross_validation`, dials-scaling.md 2.8).

Each configuration is scaled with a free set (scaling_options.use_free_set) nfolds times,
free_set_offset = 0, 1, ... (at most 100/free_set_percentage folds), and scored by the
work/free Rmeas and CC1/2 of the scaled data (scaling/free_set.work_free_statistics). The
table gives the mean and standard deviation over folds; '*' marks the best configuration
for free Rmeas (min), Rmeas gap (min), free CC1/2 (max) and CC1/2 gap (min), as DIALS's
DialsScaleCrossValidator. No output files are written.

mode=single runs the options as given; mode=multi runs each value of `parameter` (a full
PHIL path such as physical.absorption_correction or physical.decay_interval, or `model`);
a bool parameter without parameter_values compares True and False. As in DIALS, giving
`physical.x` while model is unset also sets model=physical.
"""

from __future__ import annotations

import copy

import numpy as np

from .errors import PhilError

RESULT_NAMES = ["work Rmeas", "free Rmeas", "Rmeas gap", "work CC1/2", "free CC1/2",
                "CC1/2 gap"]
MONITORED = {1: "min", 2: "min", 4: "max", 5: "min"}
MODEL_SCOPES = ("physical", "array", "KB", "dose_decay")


def _definition(master_phil, name):
    for definition in master_phil.all_definitions():
        if definition.path == name:
            return definition.object
    raise PhilError(f"cross_validation.parameter={name}: not a parameter (give the full path, "
                    "e.g. physical.absorption_correction)")


def parameter_options(master_phil, name, values):
    """The typed values to compare for parameter `name`."""
    definition = _definition(master_phil, name)
    kind = definition.type.phil_type
    if kind == "bool":
        if not values:
            return [True, False]
        out = [v.lower() == "true" for v in values if v.lower() in ("true", "false")]
        if len(out) != len(values):
            raise PhilError(f"cross_validation.parameter_values: {name} takes True or False")
        return out
    if not values:
        raise PhilError(f"cross_validation.parameter_values: give the values of {name} to compare")
    try:
        if kind == "int":
            return [int(v) for v in values]
        if kind == "float":
            return [float(v) for v in values]
    except ValueError:
        raise PhilError(f"cross_validation.parameter_values: not {kind} values for {name}") \
            from None
    if kind == "choice":
        allowed = [w.value.lstrip("*") for w in definition.words]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise PhilError(f"cross_validation.parameter_values: {bad[0]} is not a choice of "
                            f"{name} ({', '.join(allowed)})")
        return list(values)
    raise PhilError(f"cross_validation.parameter={name}: a {kind} parameter cannot be compared "
                    "(bool, int, float or choice)")


def set_parameter(params, name, value):
    """params with the dotted parameter `name` set to `value` (a copy)."""
    params = copy.deepcopy(params)
    parts = name.split(".")
    if parts[0] in MODEL_SCOPES and not params.model:
        params.model = parts[0]
    node = params
    for part in parts[:-1]:
        node = getattr(node, part)
    setattr(node, parts[-1], value)
    return params


def configurations(params, master_phil):
    """[(label, params)] to compare."""
    cv = params.cross_validation
    if cv.cross_validation_mode == "single":
        return [("user", params)]
    if not cv.parameter:
        raise PhilError("cross_validation_mode=multi needs cross_validation.parameter=")
    values = parameter_options(master_phil, cv.parameter, list(cv.parameter_values or []))
    return [(f"{cv.parameter}={v}", set_parameter(params, cv.parameter, v)) for v in values]


def job_parameters(config, fold):
    """The parameters of one fold's scaling job of a configuration."""
    run_params = copy.deepcopy(config)
    run_params.scaling_options.use_free_set = True
    run_params.scaling_options.free_set_offset = fold
    return run_params


def run_cross_validation(params, experiments, table, log, master_phil):
    """Scale every configuration nfolds times; returns (rows, table text, best labels).

    table: the input table, or a one-element list holding it (the caller's only reference,
    taken out here: under MPI the input is then dropped once each rank has its own rows).

    Under MPI (issue 11), when every fold's job runs rank-local (pipeline.rank_local_enabled),
    each rank reads its own rows once (pipeline.rank_local_input: the read-time partition of
    one job) and every job scales a copy of them; the work/free statistics are then
    rank_merge.rank_merging_statistics of the ranks' rows (free_set.work_free_statistics),
    the one-process values bit for bit. Otherwise every rank repeats every job on all rows."""
    from .backends import mpi_world
    from .io.expt import ExperimentList
    from .pipeline import rank_local_enabled, rank_local_input, run_scaling_job
    from .scaling.free_set import fold_interval, work_free_statistics

    holder = table if isinstance(table, list) else [table]
    del table
    configs = configurations(params, master_phil)
    folds = {label: range(min(params.cross_validation.nfolds,
                                  fold_interval(config.scaling_options.free_set_percentage)))
             for label, config in configs}
    rank_rows = None
    if mpi_world.n_ranks() > 1 and all(
            rank_local_enabled(job_parameters(config, fold), len(experiments))
            for label, config in configs for fold in folds[label]):
        rank_rows = rank_local_input(experiments, holder)
    experiments_dict = experiments.to_dict()
    rows = []
    for label, config in configs:
        so = config.scaling_options
        results = []
        for fold in folds[label]:
            run_params = job_parameters(config, fold)
            log.info(f"Cross-validation: {label}, fold {fold + 1}")
            # each job scales a copy (its stages consume their input); lazy columns stay
            # in their file
            job_table = rank_rows.table.copy() if rank_rows is not None else holder[0].copy()
            scaled_experiments, scaled, _ = run_scaling_job(
                run_params, ExperimentList.from_dict(copy.deepcopy(experiments_dict)),
                job_table, log, rank_rows=rank_rows)
            del job_table
            results.append(work_free_statistics(scaled, scaled_experiments,
                                                so.free_set_percentage, fold))
            del scaled
        rows.append((label, np.array(results)))
    text, best = format_results(rows)
    log.info("Summary of the cross validation analysis:\n" + text)
    return rows, text, best


def format_results(rows):
    """The DIALS results table: mean and std dev rows per configuration, '*' on the best."""
    means = [r.mean(axis=0) for _, r in rows]
    stds = [r.std(axis=0, ddof=1) if len(r) > 1 else np.zeros(r.shape[1]) for _, r in rows]
    best = {}
    for column, criterion in MONITORED.items():
        values = [m[column] for m in means]
        pick = int(np.argmin(values) if criterion == "min" else np.argmax(values))
        best[RESULT_NAMES[column]] = rows[pick][0]
    header = ["option", ""] + RESULT_NAMES
    body = []
    for (label, _), mean, std in zip(rows, means, stds):
        cells = [f"{v:.5f}" + ("*" if best.get(RESULT_NAMES[i]) == label and i in MONITORED
                               else "") for i, v in enumerate(mean)]
        body.append([label, "mean"] + cells)
        body.append(["", "std dev"] + [f"{v:.5f}" for v in std])
    widths = [max(len(str(r[c])) for r in [header] + body) for c in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", line]
    out += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    out.append(line)
    return "\n".join(out), best
