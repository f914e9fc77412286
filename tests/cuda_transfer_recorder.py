"""Records every host->device copy of a process run under NUMBA_ENABLE_CUDASIM=1, at the
numba.cuda API (cuda.to_device and a device array's copy_to_device from a host array),
independently of the job table's own counter (backends.cuda_job_table): each copy is filed
under the job table's current pass and call. Used by tests/test_cuda_scaling.py's quartz run:
install(), run the program, dump(path)."""

import json

import numpy as np
from numba import cuda

RECORDS = []
# (pass, call, nbytes, dtype kind, shape) of every copy, for tests that look at what crossed
DETAILS = []


def _where():
    from dials_vmerge.backends.cuda_job_table import _CURRENT

    table = _CURRENT[0]
    if table is None:
        return "none", -1
    return table._pass, len(table.transfers.get(table._pass, [])) - 1


def install():
    to_device = cuda.to_device
    device_type = type(cuda.device_array(1))
    copy_to_device = device_type.copy_to_device

    def record(obj):
        array = np.asarray(obj)
        RECORDS.append((*_where(), int(array.nbytes)))
        DETAILS.append((*_where(), int(array.nbytes), array.dtype.kind, list(array.shape)))

    def recorded_to_device(obj, *args, **kwargs):
        record(obj)
        return to_device(obj, *args, **kwargs)

    def recorded_copy_to_device(self, ary, *args, **kwargs):
        if not hasattr(ary, "copy_to_host"):  # device to device copies do not cross the bus
            record(ary)
        return copy_to_device(self, ary, *args, **kwargs)

    cuda.to_device = recorded_to_device
    device_type.copy_to_device = recorded_copy_to_device


def dump(path):
    with open(path, "w") as f:
        json.dump(RECORDS, f)
