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
