"""Paths of test data shared by the merging program tests (not a test module)."""

import os

HERE = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")


def quartz_scaled():
    return os.path.join(HERE, "scaled.expt"), os.path.join(HERE, "scaled.refl")
