"""Writes reference.npz: the inverse scale factors of the per-dataset engine (commit ce46a25,
before the flat engine), for tests/test_flat_engine.py.

Produced by running this script on a checkout of ce46a25:
    .venv/bin/python tests/data/flat_engine/make_reference.py
Each case runs pipeline.run_scaling_job with the default PHIL settings (plus the arguments
listed) and stores, per output row: inverse_scale_factor (float64), its variance (float32)
and the flags (uint32), row order as written to scaled.refl. Rerunning it on a later commit
rewrites the file: do that only if the change of g is understood and intended.
"""

import copy
import logging
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import dials_vmerge  # noqa: E402,F401  (cctbx before numba)
from dials_vmerge.io import read_experiments, read_reflections  # noqa: E402
from dials_vmerge.io.expt import ExperimentList  # noqa: E402
from dials_vmerge.pipeline import run_scaling_job  # noqa: E402

LOG = logging.getLogger("flat_engine_reference")
QUARTZ = os.path.join(HERE, "..", "dials", "quartz_processed")


def cases():
    """name -> (arguments, loader returning (experiments, table))."""
    from dials_vmerge.simulate import simulate_rotation, simulate_stills

    def quartz():
        return (read_experiments(os.path.join(QUARTZ, "integrated.expt")),
                read_reflections(os.path.join(QUARTZ, "integrated.refl")))

    def simulation(sim):
        def load():
            experiments, table, _ = sim()
            return ExperimentList.from_dict(copy.deepcopy(experiments)), table.copy()
        return load

    # Defaults changed after ce46a25 (issue 14: error-model deviation=unbiased fitted by
    # likelihood; issue 10: reflection_selection.method=auto uses every reflection of small
    # jobs): these pin the settings ce46a25's defaults meant, so the engines are compared on
    # the same problem.
    ce46a25_defaults = ["weighting.error_model.basic.deviation=dials",
                        "weighting.error_model.basic.minimisation=individual"]
    rotation = ce46a25_defaults + ["reflection_selection.method=quasi_random"]
    stills = ce46a25_defaults + ["reflection_selection.method=intensity_ranges"]
    return {
        "quartz": (["partiality_cutoff=0.4"] + rotation, quartz),
        "four_sweeps": (["model=physical"] + rotation, simulation(
            lambda: simulate_rotation(n_obs_target=24_000, n_sweeps=4, model="physical",
                                      seed=5))),
        "kb_stills": (["model=KB"] + stills, simulation(
            lambda: simulate_stills(n_stills=30, seed=4, space_group="P 4 3 2",
                                    unit_cell=(60.0, 60.0, 60.0, 90.0, 90.0, 90.0)))),
    }


def scaling_params(*args):
    import iotbx.phil
    from dials_vmerge.cli import load_phil_text

    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


def run_case(arguments, load):
    experiments, table = load()
    params = scaling_params(*arguments)
    params.compute.nproc = 1  # one chunk: the summation order of the reference
    _, scaled, _ = run_scaling_job(params, experiments, table, LOG)
    return (np.asarray(scaled["inverse_scale_factor"], dtype=np.float64),
            np.asarray(scaled["inverse_scale_factor_variance"], dtype=np.float32),
            np.asarray(scaled["flags"], dtype=np.uint32))


def main():
    out = {}
    for name, (arguments, load) in cases().items():
        g, var_g, flag_values = run_case(arguments, load)
        out[f"{name}_g"], out[f"{name}_var_g"], out[f"{name}_flags"] = g, var_g, flag_values
        print(name, g.size)
    np.savez_compressed(os.path.join(HERE, "reference.npz"), **out)


if __name__ == "__main__":
    main()
