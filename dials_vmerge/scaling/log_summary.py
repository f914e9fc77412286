"""Per-dataset values in one log line that stays readable at any number of datasets.

Up to MAX_LISTED datasets the values are listed in dataset order, as before; above that the
line gives the total (for counts), min / median / max and how many datasets. The full
per-dataset detail goes to the summary dict (and from there to the JSON output).
"""

from __future__ import annotations

import numpy as np

MAX_LISTED = 20


def summarise_per_dataset(values, fmt="{}"):
    values = list(values)
    if len(values) <= MAX_LISTED:
        return ", ".join(fmt.format(v) for v in values)
    array = np.asarray(values, dtype=np.float64)
    median = float(np.median(array))
    counts = all(isinstance(v, (int, np.integer)) for v in values)
    text = (f"{len(values)} datasets, "
            + (f"total {int(array.sum())}, " if counts else "")
            + f"min {fmt.format(values[int(np.argmin(array))])}, "
            + f"median {median:g}, max {fmt.format(values[int(np.argmax(array))])}")
    if counts:
        text += f", {int(np.count_nonzero(array == 0))} with none"
    return text
