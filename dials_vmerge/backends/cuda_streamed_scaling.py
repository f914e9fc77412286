"""compute.device=cuda when a scaling job's layout exceeds free device memory: the KB family
and physical model targets streamed from the host (kernels.cuda.streamed).

stream_layout decides, before anything goes to the device, whether CudaScalingTarget keeps its
observations on the host: forced by host_resident=True, or when the device-resident layout
(observation arrays, model inputs, dg/dp and its column entries) is larger than the usable free
device memory, capped by compute.gpu.device_memory_limit. evaluate gives (Phi, gradient over
the model's ELL columns) like the device-resident path, bit-identical for the same batches.

The normal equations of full-matrix rounds run over the same streamed batches
(normal_equations, kernels.cuda.streamed_normal).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.kernels.cuda.streamed import (HostStreamedTarget, layout_fits,
                                                streamed_batch_size)


def _layout(target):
    """(kind, model inputs by name, ELL columns, n_params, fixed flags) of a KB family or
    fused physical target."""
    if target.fused is not None:
        f = target.fused
        n_abs = 0 if f.absorption_coefficients is None else f.absorption_coefficients.shape[1]
        cols = device_models.physical_columns(f.first_param, f.absorption_first, n_abs)
        inputs = {"record": np.ascontiguousarray(f.record),
                  "first_param": np.ascontiguousarray(f.first_param)}
        if f.absorption_coefficients is not None:
            inputs["absorption"] = np.ascontiguousarray(f.absorption_coefficients,
                                                        dtype=np.float64)
            inputs["absorption_first"] = np.ascontiguousarray(f.absorption_first,
                                                              dtype=np.int32)
        if f.fixed_factor is not None:
            inputs["fixed"] = np.ascontiguousarray(f.fixed_factor, dtype=np.float64)
        return "physical", inputs, cols, f.n_full + 5
    fam = target.family
    cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col, fam.decay_col)
    inputs = {"row_dataset": np.ascontiguousarray(fam.row_dataset),
              "inv_two_d_sq": np.ascontiguousarray(fam.inv_two_d_sq, dtype=np.float64)}
    if fam.fixed_factor is not None:
        inputs["fixed"] = np.ascontiguousarray(fam.fixed_factor, dtype=np.float64)
    return "kb", inputs, cols, target.n_par


def device_resident_bytes(n_obs, inputs, n_slots):
    """Device bytes of the device-resident layout: I, w, g, the residual factor (8 B each),
    dg/dp and its column entries (8 B each per ELL slot) and the model inputs."""
    return (4 * 8 + 2 * 8 * n_slots) * n_obs + sum(int(a.nbytes) for a in inputs.values())


def stream_layout(target, host_resident, batch_size, device_memory_limit):
    """Set target up for host streaming and return True, or return False (device-resident)."""
    t = target.table
    kind, inputs, cols, n_params = _layout(target)
    n, n_slots = t.n_obs, cols.shape[1]
    total = device_resident_bytes(n, inputs, n_slots)
    if host_resident is None and layout_fits(total, device_memory_limit):
        return False
    if batch_size is None:
        batch_size = streamed_batch_size(n, total / max(n, 1), device_memory_limit)
    target._kind = kind
    target._n_params = n_params
    target._cols = cols
    target._batch_size = batch_size
    target._device_target = HostStreamedTarget(t.intensity, t.weight, t.group_start, cols,
                                               n_params, batch_size, inputs)
    target.host_resident = True
    # one-element stand-ins for the optional inputs a batch does not have
    target._placeholder = cuda.to_device(np.zeros(1))
    target._placeholder_2d = cuda.to_device(np.zeros((1, 1)))
    target._placeholder_int = cuda.to_device(np.zeros(1, np.int32))
    return True


def evaluate(target, x):
    """(Phi, gradient over the ELL columns) of the host-resident layout at free vector x."""
    return target._device_target.evaluate(model_launcher(target, x))


def normal_equations(target, x):
    """(Phi, J^T W r, J^T W J) over the free parameters of the host-resident layout at x,
    on the device over the streamed batches (kernels.cuda.streamed_normal)."""
    from dials_vmerge.kernels.cuda.streamed_normal import StreamedNormalEquations

    if getattr(target, "_streamed_normal", None) is None:
        target._streamed_normal = StreamedNormalEquations(
            target._device_target, target.normal_free_columns(), target.n_par)
    return target._streamed_normal.evaluate(model_launcher(target, x))


def model_launcher(target, x):
    """launch(stream, inputs, g, deriv): the model kernel of one streamed batch at x (the
    parameters go up once, here)."""
    tpb = device_models.THREADS_PER_BLOCK
    if target._kind == "kb":
        scale, decay = target.family.parameters(x)
        scale, decay = cuda.to_device(scale), cuda.to_device(decay)

        def launch(stream, v, g, deriv):
            has_fixed = "fixed" in v
            device_models.kb_family_kernel[device_models.blocks(g.shape[0]), tpb, stream](
                v["row_dataset"], v["inv_two_d_sq"], v.get("fixed", target._placeholder),
                has_fixed, scale, decay, g, deriv)
    else:
        target.manager.set_free(x)
        parameters = cuda.to_device(target.fused.full_parameters())

        def launch(stream, v, g, deriv):
            has_abs = "absorption" in v
            device_models.physical_model_kernel[device_models.blocks(g.shape[0]), tpb, stream](
                v["record"], v["first_param"], v.get("absorption", target._placeholder_2d),
                v.get("absorption_first", target._placeholder_int), has_abs,
                v.get("fixed", target._placeholder), "fixed" in v, parameters, g, deriv)
    return launch
