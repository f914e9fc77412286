"""Shared fixtures. Importing dials_vmerge first fixes the cctbx/numba import order."""

import os
import sys

import dials_vmerge  # noqa: F401  (must precede numba/scipy imports in test modules)
import pytest

DATA = os.path.join(os.path.dirname(__file__), "data", "dials")
# benchmark-only code (benchmarks/benchmark_hooks.py) is importable by the tests that check it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


@pytest.fixture
def quartz_dir():
    return os.path.join(DATA, "quartz_processed")


def data_path(*parts):
    return os.path.join(DATA, *parts)


@pytest.fixture(scope="session")
def rank_local_simulations(tmp_path_factory):
    """mpi_helpers.RANK_LOCAL_SIMULATIONS' inputs, simulated once for every test file that
    compares one process with MPI ranks on them (their outputs go elsewhere)."""
    import mpi_helpers

    return mpi_helpers.simulated_inputs(tmp_path_factory.mktemp("rank_local_inputs"),
                                        mpi_helpers.RANK_LOCAL_SIMULATIONS)
