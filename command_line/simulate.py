"""dials.vmerge.simulate: write simulated .expt/.refl files and their truth (truth.h5)."""

from dials_vmerge.cli import Program

HELP = """dials.vmerge.simulate [mode=rotation|stills] [n_obs_target=N] [seed=S] [model=auto] ...

Simulates diffraction data with a known truth: true intensities (Wilson statistics), a true
scale model (physical, array or KB; stills: per-image KB), counting noise with background,
optional outliers and error-model inflation. Writes simulated.expt, simulated.refl and
truth.h5 (true g per observation, true intensities per unique reflection, model, seed).

Examples:
  dials.vmerge.simulate n_obs_target=20000 n_sweeps=4 seed=3
  dials.vmerge.simulate mode=stills stills.n_images=100 anomalous=True
  dials.vmerge.simulate n_images=360 output.prefix=sim
"""


def run(params, inputs, log):
    import numpy as np

    from dials_vmerge.simulate import simulate, write_outputs

    experiments, table, truth = simulate(params.simulate)
    out = params.output
    if out.prefix:
        out.experiments, out.reflections, out.truth = (
            f"{out.prefix}.expt", f"{out.prefix}.refl", f"{out.prefix}_truth.h5")
    write_outputs(experiments, table, truth, out.experiments, out.reflections, out.truth)
    n_unique_seen = len(np.unique(truth.unique_index))
    log.info(
        f"Simulated {table.nrows} observations of {n_unique_seen} unique reflections "
        f"({truth.structure.n_unique} to d_min {truth.structure.d_min:g} A) in "
        f"{len(experiments['experiment'])} experiment(s), true model {truth.models[0].kind}"
    )
    log.info(f"Space group {truth.structure.space_group.info()}, unit cell "
             + " ".join(f"{v:.3f}" for v in truth.unit_cell))
    log.info(f"Wrote {out.experiments}, {out.reflections} and {out.truth}")


main = Program(name="dials.vmerge.simulate", phil_files=["simulate"], run=run, help=HELP,
               needs_data=False).main
