"""Readers and writers: DIALS `.refl` (msgpack) and `.expt` (JSON); atomic output."""

from .expt import Experiment, ExperimentList, read_experiments, write_experiments
from .refl import read_reflections, write_reflections

__all__ = [
    "Experiment",
    "ExperimentList",
    "read_experiments",
    "write_experiments",
    "read_reflections",
    "write_reflections",
]
