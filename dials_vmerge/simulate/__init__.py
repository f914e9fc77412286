"""Forward model of diffraction data with known truth (dials.vmerge.simulate).

In memory:
    experiments, table, truth = simulate_rotation(n_obs_target=100_000, n_sweeps=3,
                                                  model="physical", seed=1)
    experiments, table, truth = simulate_stills(n_stills=200, seed=1)
    experiments, table, truth = simulate(params)   # PHIL extract, settings, or dict

`experiments` is an ExperimentList JSON dict (dials-formats 4.x); `table` a ReflectionTable
with the columns dials.integrate writes; `truth` a Truth (true g per row, true intensities
per unique ASU reflection, model parameters, seed). `write_outputs` writes the .expt, .refl
and truth.h5 files. Every knob is a field of SimulationSettings (settings.py), e.g.
multiplicity, mean_i_over_sigma, outlier_fraction, anomalous, bijvoet_ratio, error_model_a/b,
d_min, space_group, unit_cell, model (physical | array | KB).
"""

from __future__ import annotations

from .settings import SimulationSettings
from .truth import Truth, read_truth


def _settings_from(params) -> SimulationSettings:
    if isinstance(params, SimulationSettings):
        return params
    if isinstance(params, dict):
        return SimulationSettings.from_mapping(params)
    scope = getattr(params, "simulate", params)
    from .phil_settings import settings_from_phil

    return settings_from_phil(scope)


def simulate(params):
    """(experiments_dict, table, truth) from PHIL params, a SimulationSettings or a dict."""
    from .generate import simulate_from_settings

    return simulate_from_settings(_settings_from(params))


def simulate_rotation(n_obs_target=None, n_sweeps=3, model="physical", seed=0, **knobs):
    """Rotation sweeps (one crystal per sweep). See SimulationSettings for the knobs."""
    return simulate(dict(mode="rotation", n_obs_target=n_obs_target, n_sweeps=n_sweeps,
                         model=model, seed=seed, **knobs))


def simulate_stills(n_stills=None, n_obs_target=None, seed=0, **knobs):
    """Stills with random orientations and a per-image KB truth (scale and B)."""
    knobs.setdefault("model", "KB")
    return simulate(dict(mode="stills", n_stills=n_stills, n_obs_target=n_obs_target,
                         seed=seed, **knobs))


def write_outputs(experiments: dict, table, truth: Truth, experiments_path: str,
                  reflections_path: str, truth_path: str) -> None:
    """Write the .expt, .refl and truth.h5 files (each atomically)."""
    from ..io import write_reflections
    from ..io.expt import ExperimentList, write_experiments

    write_experiments(ExperimentList.from_dict(experiments), experiments_path)
    write_reflections(table, reflections_path)
    truth.write(truth_path)


__all__ = [
    "SimulationSettings",
    "Truth",
    "read_truth",
    "simulate",
    "simulate_rotation",
    "simulate_stills",
    "write_outputs",
]
