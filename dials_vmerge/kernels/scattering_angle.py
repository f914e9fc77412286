"""The largest angle between the rows' s1 vectors and the beam, in one pass.

The physical model's absorption default asks whether any reflection lies more than ~2.6
degrees from the beam. numpy formed the rows' lengths, a copy of the rows with a non-zero s1
and their cosines (~55-90 ms and ~60 MB of temporaries for a 1e6 sweep; issue 10); this
kernel reads each row once. The length is sqrt((x*x + y*y) + z*z), numpy's row norm; the dot
product with the beam is summed in the same order, which BLAS need not follow, so the angle
may differ from numpy's in its last bit (the caller only compares it with a threshold).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


# error_model="numpy": a zero beam or row length divides as numpy does (inf/NaN, no raise)
@njit(cache=True, error_model="numpy")
def max_scattering_angle_kernel(s1, beam, beam_length):
    """(max angle in radians over rows with |s1| > 0, number of such rows); NaN if a cosine
    is NaN (as numpy's max of the angles)."""
    best = -np.inf
    n_good = 0
    for i in range(s1.shape[0]):
        x = s1[i, 0]
        y = s1[i, 1]
        z = s1[i, 2]
        length = math.sqrt((x * x + y * y) + z * z)
        if not length > 0.0:
            continue
        n_good += 1
        cosine = ((x * beam[0] + y * beam[1]) + z * beam[2]) / (length * beam_length)
        if math.isnan(cosine):
            return math.nan, n_good
        angle = math.acos(min(max(cosine, -1.0), 1.0))
        if angle > best:
            best = angle
    return best, n_good
