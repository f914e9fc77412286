"""Unit-cell consistency of the datasets merged together.

Merging uses one (median) cell for every dataset, as dials.scale and dials.merge do, so
datasets whose cells differ from it are merged on the wrong d spacings. A difference above
1% in any cell parameter gets a warning naming the datasets; above 10% the run stops unless
allow_inconsistent_cells=True (DIALS itself merges such cells without a word).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from .errors import VmergeError

WARN_FRACTION = 0.01
ERROR_FRACTION = 0.10
MAX_NAMED = 10  # datasets named in one message; the rest are counted


@dataclass
class CellDeviations:
    parameters: np.ndarray  # (n_datasets, 6): a, b, c (Angstrom), alpha, beta, gamma (degrees)
    median: np.ndarray  # (6,)
    largest_fraction: np.ndarray  # (n_datasets,): max over the six of |p - median| / median


def cell_deviations(experiments) -> CellDeviations:
    from .geometry import unit_cell

    parameters = np.array([unit_cell(e).parameters() for e in experiments], dtype=np.float64)
    median = np.median(parameters, axis=0)
    largest = np.max(np.abs(parameters - median) / median, axis=1)
    return CellDeviations(parameters, median, largest)


def _names(experiments, dataset_ids, indices) -> str:
    shown = [f"{dataset_ids[i]} ({experiments[i].identifier})" for i in indices[:MAX_NAMED]]
    more = len(indices) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _cell_text(p) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in p) + ")"


def check_unit_cells(experiments, dataset_ids: List[int], log,
                     allow_inconsistent: bool = False) -> CellDeviations:
    """Warn about datasets whose cell differs from the median by more than 1% in any
    parameter; raise VmergeError above 10% unless allow_inconsistent. dataset_ids: the id
    value of each experiment (how the user names datasets in the other parameters)."""
    deviations = cell_deviations(experiments)
    if len(experiments) < 2:
        return deviations
    largest = deviations.largest_fraction
    over_error = np.flatnonzero(largest > ERROR_FRACTION)
    over_warning = np.flatnonzero(largest > WARN_FRACTION)
    median = _cell_text(deviations.median)
    if over_error.size and not allow_inconsistent:
        worst = int(np.argmax(largest))
        raise VmergeError(
            f"unit cells differ from the median cell {median} by more than "
            f"{ERROR_FRACTION:.0%} in dataset(s) {_names(experiments, dataset_ids, over_error)} "
            f"(largest {largest[worst]:.1%}: {_cell_text(deviations.parameters[worst])}); "
            "scale them separately, or set allow_inconsistent_cells=True to merge anyway")
    if over_warning.size:
        log.warning(
            f"Warning: unit cells of {over_warning.size} dataset(s) differ from the median cell "
            f"{median} by more than {WARN_FRACTION:.0%} (largest {largest.max():.1%}): "
            f"{_names(experiments, dataset_ids, over_warning)}; merging uses the median cell")
    return deviations


def check_unit_cells_of_table(experiments, table, log, allow_inconsistent=False):
    """check_unit_cells with the id values read from the table's identifier map."""
    by_identifier = {v: k for k, v in table.identifiers.items()}
    ids = [by_identifier.get(e.identifier, n) for n, e in enumerate(experiments)]
    return check_unit_cells(experiments, ids, log, allow_inconsistent)
