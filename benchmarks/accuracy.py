#!/usr/bin/env python
"""The accuracy harness (issue 14): how close are merged intensities to the truth?

For each simulated scenario, each scaling target (least squares; likelihood; likelihood with
a Student-t of 4 degrees of freedom) and each merging method:
  - rel_error: relative error of the merged I (Friedel mates together; I(+), I(-) apart in
    the anomalous scenario) against the true intensities, after the overall K exp(-B d*^2/2) fit scaling leaves free
    (dials_vmerge.simulate.compare);
  - oracle: the same for merging the same observations with the TRUE scales and TRUE outlier
    flags (sigmas as the run made them), and gap = rel_error / oracle - 1;
  - true g, our flags: the true scales with the run's outlier flags, which splits the gap
    into the part due to the scales and the part due to outlier flagging;
  - cc_anom: correlation of merged I(+) - I(-) with the true differences (anomalous scenario);
  - sigma_sd: SD of (I_merged - K exp(-B d*^2/2) I_true) / SIGI, 1 when the merged sigmas are
    calibrated.

Scenarios (sizes chosen to run in a few minutes on 2 cores):
  strong    rotation, two sweeps, I/sigma ~10, multiplicity ~6;
  weak      rotation, mean I/sigma ~2 (most reflections near the resolution limit, where
            the Wilson fall-off leaves I/sigma < 1);
  stills    stills, multiplicity ~10, partiality errors: each observed intensity multiplied
            by exp(0.1 N(0,1)) (a partiality model 10% wrong, not in the reported sigma);
  outliers  rotation, I/sigma ~10, 2% gross outliers;
  anomalous rotation, I/sigma ~10, Bijvoet ratio 0.05.

    python benchmarks/accuracy.py [--n-obs 40000] [--scenarios strong,weak] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time

import numpy as np

import dials_vmerge  # noqa: F401  (before scipy.special and numba: see README)

ORTHORHOMBIC = dict(space_group="P 21 21 21", unit_cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0))
SCENARIOS = {
    "strong": dict(mode="rotation", n_sweeps=2, model="physical", multiplicity=6.5,
                   mean_i_over_sigma=10.0, **ORTHORHOMBIC),
    "weak": dict(mode="rotation", n_sweeps=2, model="physical", multiplicity=6.5,
                 mean_i_over_sigma=2.0, **ORTHORHOMBIC),
    "stills": dict(mode="stills", model="KB", multiplicity=10.0, mean_i_over_sigma=10.0,
                   **ORTHORHOMBIC),
    "outliers": dict(mode="rotation", n_sweeps=2, model="physical", multiplicity=6.5,
                     mean_i_over_sigma=10.0, outlier_fraction=0.02, **ORTHORHOMBIC),
    "anomalous": dict(mode="rotation", n_sweeps=2, model="physical", multiplicity=6.5,
                      mean_i_over_sigma=10.0, anomalous=True, bijvoet_ratio=0.05,
                      **ORTHORHOMBIC),
}
PARTIALITY_ERROR_SD = 0.1  # stills: sd of the log of the multiplicative partiality error
METHODS = ("classical", "robust", "variational")
LOG = logging.getLogger("accuracy")


def vmerge_params(*args):
    import iotbx.phil

    from dials_vmerge.cli import load_phil_text

    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output",
                                              "merging"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


# scaling target name in the table -> its parameters
TARGETS = {
    "least_squares": [],
    "likelihood": ["scaling_options.target=likelihood"],
    "likelihood_t4": ["scaling_options.target=likelihood",
                      "scaling_options.likelihood.student_t_dof=4"],
}


def simulate_scenario(name, n_obs, seed):
    from dials_vmerge.simulate import simulate

    knobs = dict(SCENARIOS[name], n_obs_target=n_obs, seed=seed)
    experiments, table, truth = simulate(knobs)
    if name == "stills":
        rng = np.random.default_rng(seed + 1000)
        factor = np.exp(PARTIALITY_ERROR_SD * rng.standard_normal(table.nrows))
        for column in ("intensity.sum.value", "intensity.prf.value"):
            table[column] = np.asarray(table[column]) * factor
    return experiments, table, truth


def merge(table, experiments, method):
    from dials_vmerge.merging.api import merge_scaled_table

    return merge_scaled_table(table, experiments, vmerge_params(f"merging.method={method}"))


def oracle_table(scaled, truth):
    """The scaled table with the true g and the true outlier flags on the same rows."""
    from dials_vmerge import flags

    table = scaled.copy()
    rows = np.asarray(table["truth_row"], dtype=np.int64)
    table["inverse_scale_factor"] = truth.inverse_scale_factor[rows]
    everything = np.ones(table.nrows, dtype=bool)
    table.unset_flags(everything, flags.outlier_in_scaling)
    table.set_flags(truth.is_outlier[rows].astype(bool), flags.outlier_in_scaling)
    return table


def figures(result, truth):
    from dials_vmerge.simulate.compare import cc_anomalous, compare_with_truth

    if truth.structure.anomalous:
        # I(+) and I(-) apart: Friedel-merged I mixes the two hands in proportion to their
        # multiplicities, which differs from the truth's mean by up to the Bijvoet difference.
        m = result.merged_anomalous
        index, intensity = truth.structure.anomalous_arrays()
    else:
        m = result.merged
        index, intensity = truth.miller_index, truth.intensity
    comparison = compare_with_truth(m.asu_index, m.intensity, m.sigma, m.dstar_sq, index,
                                    intensity)
    out = {"rel_error": comparison.relative_error, "sigma_sd": comparison.calibration_sd,
           "n_unique": comparison.n, "cc_anom": None}
    if truth.structure.anomalous:
        out["cc_anom"] = cc_anomalous(m.asu_index, m.intensity, index, intensity)
    return out


def run_scenario(name, n_obs, seed, targets, methods):
    from dials_vmerge.io.expt import ExperimentList
    from dials_vmerge.pipeline import run_scaling_job

    experiments_dict, table, truth = simulate_scenario(name, n_obs, seed)
    table["truth_row"] = np.arange(table.nrows, dtype=np.uint64)
    rows = []
    for target in targets:
        args = TARGETS[target]
        start = time.perf_counter()
        experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
        experiments, scaled, summary = run_scaling_job(vmerge_params(*args), experiments,
                                                       table.copy(), LOG)
        scale_seconds = time.perf_counter() - start
        error_model = summary["datasets"][0]["error_model"]
        oracle = oracle_table(scaled, truth)
        true_scales = scaled.copy()  # true g, the run's outlier flags
        true_scales["inverse_scale_factor"] = truth.inverse_scale_factor[
            np.asarray(scaled["truth_row"], dtype=np.int64)]
        for method in methods:
            ours = figures(merge(scaled, experiments, method), truth)
            best = figures(merge(oracle, experiments, method), truth)
            scales_only = figures(merge(true_scales, experiments, method), truth)
            rows.append({
                "scenario": name, "target": target, "method": method,
                "rel_error": ours["rel_error"], "oracle": best["rel_error"],
                "gap": ours["rel_error"] / best["rel_error"] - 1.0,
                "true_g_run_flags": scales_only["rel_error"],
                "cc_anom": ours["cc_anom"], "oracle_cc_anom": best["cc_anom"],
                "sigma_sd": ours["sigma_sd"], "n_obs": int(scaled.nrows),
                "n_unique": ours["n_unique"], "error_model": error_model,
                "scaling_seconds": scale_seconds,
            })
            LOG.info(json.dumps(rows[-1]))
    return rows


def format_table(rows):
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| scenario | target | merging | merged-I error | oracle | gap to oracle "
             "| true g, our flags | CCanom (oracle) | sigma SD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cc = "-" if r["cc_anom"] is None else f"{r['cc_anom']:.3f} ({r['oracle_cc_anom']:.3f})"
        lines.append(f"| {r['scenario']} | {r['target']} | {r['method']} "
                     f"| {fmt(r['rel_error'], '.4f')} | {fmt(r['oracle'], '.4f')} "
                     f"| {100 * r['gap']:+.1f}% | {fmt(r['true_g_run_flags'], '.4f')} "
                     f"| {cc} | {fmt(r['sigma_sd'], '.3f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-obs", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--targets", default=None, help="default: " + ",".join(TARGETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default="accuracy.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    targets = args.targets.split(",") if args.targets else list(TARGETS)
    rows = []
    for name in args.scenarios.split(","):
        rows.extend(run_scenario(name, args.n_obs, args.seed, targets,
                                 args.methods.split(",")))
    table = format_table(rows)
    print(table)
    with open(args.json, "w") as f:
        json.dump({"n_obs": args.n_obs, "seed": args.seed, "rows": rows, "table": table}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
