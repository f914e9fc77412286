"""compute.device=cuda when a scaling job's layout exceeds free device memory: the KB family,
physical, array, mixed-family (backends.cuda_mixed_models.StreamedMixedModel) and
host-evaluated model targets streamed from the host (kernels.cuda.streamed).

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
    if target.family is None:
        return _array_or_host_layout(target)
    fam = target.family
    cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col, fam.decay_col)
    inputs = {"row_dataset": np.ascontiguousarray(fam.row_dataset),
              "inv_two_d_sq": np.ascontiguousarray(fam.inv_two_d_sq, dtype=np.float64)}
    if fam.fixed_factor is not None:
        inputs["fixed"] = np.ascontiguousarray(fam.fixed_factor, dtype=np.float64)
    return "kb", inputs, cols, target.n_par


def _array_or_host_layout(target):
    """The array model's smoothed grids (kernels.cuda.array: weights and parameter indices
    per slot stream with the batch), or a host-evaluated model (mixed families: g and dg/dp
    of each call stream up batch by batch; its ELL columns from the current parameters)."""
    from .cuda_scaling import array_layout

    t, manager = target.table, target.manager
    layout = array_layout(manager.models, t.dataset_id, t.loc_index,
                          manager.column_of_parameter)
    target._array_layout = layout  # the device-resident set-up reuses it
    if layout is not None:
        inputs = {"weights": np.ascontiguousarray(layout["weights"]),
                  "full_index": np.ascontiguousarray(layout["full_index"])}
        if layout["fixed_factor"] is not None:
            inputs["fixed"] = np.ascontiguousarray(layout["fixed_factor"], dtype=np.float64)
        target._component_start_host = layout["component_start"]
        return "array", inputs, layout["free_col"], target.n_par
    mixed = target._mixed_layout()
    if mixed is not None:
        # several device model families: sized here; on the device, resident when the
        # layout fits (CudaScalingTarget reuses this host layout), else per streamed batch
        # (cuda_mixed_models.StreamedMixedModel)
        target._mixed_host = mixed
        inputs = {f"{f} {name}": np.asarray(v) for f, (*_, family_inputs, _) in
                  enumerate(mixed.families) for name, v in family_inputs.items()
                  if v is not None and name != "component_start"}
        # each family's table rows, and its own g and dg/dp (the scatter's source)
        from types import SimpleNamespace

        inputs["positions and family buffers"] = SimpleNamespace(
            nbytes=mixed.n * 8 * (2 + mixed.width))
        return "mixed", inputs, mixed.cols, target.n_par
    return _host_model_layout(target)


def _host_model_layout(target):
    _, _, cols = target._ell(target.manager.get_free())
    return "host-model", {}, np.ascontiguousarray(cols), target.n_par


def device_resident_bytes(n_obs, inputs, n_slots):
    """Device bytes of the device-resident layout: I, w, g, the residual factor (8 B each),
    dg/dp and its column entries (8 B each per ELL slot) and the model inputs."""
    return (4 * 8 + 2 * 8 * n_slots) * n_obs + sum(int(a.nbytes) for a in inputs.values())


def mixed_streamed_bytes_per_observation(layout):
    """Device bytes per observation of one streamed buffer set of a mixed job: I, w, g, the
    residual factor, dg/dp and its column entries of the combined table, and, for every
    family, its inputs, position, g and dg/dp per row. Each family's buffers are sized to its
    largest share of a batch, at most the whole batch: counted as if every batch row were
    every family's (an upper bound: the batch size it gives always fits)."""
    per_row = 4 * 8 + 2 * 8 * layout.width
    for _, _, rows, inputs, cols in layout.families:
        if not rows.size:
            continue
        per_row += 8 + 8 + 8 * cols.shape[1]  # position, g, dg/dp
        per_row += sum(int(v.nbytes) // rows.size for k, v in inputs.items()
                       if v is not None and k != "component_start")
    return per_row


def stream_layout(target, host_resident, batch_size, device_memory_limit):
    """Set target up for host streaming and return True, or return False (device-resident)."""
    t = target.table
    kind, inputs, cols, n_params = _layout(target)
    n, n_slots = t.n_obs, cols.shape[1]
    total = device_resident_bytes(n, inputs, n_slots)
    if host_resident is None and layout_fits(total, device_memory_limit):
        return False
    per_observation = total / max(n, 1)
    if kind == "mixed":
        # each family's inputs stream through its own per-stream buffers, not the target's
        # (backends.cuda_mixed_models.StreamedMixedModel)
        inputs = {}
        per_observation = mixed_streamed_bytes_per_observation(target._mixed_host)
    if batch_size is None:
        batch_size = streamed_batch_size(n, per_observation, device_memory_limit)
    target._kind = kind
    target._n_params = n_params
    target._cols = cols
    target._batch_size = batch_size
    target._device_target = HostStreamedTarget(t.intensity, t.weight, t.group_start, cols,
                                               n_params, batch_size, inputs)
    target.host_resident = True
    if kind == "mixed":
        from .cuda_mixed_models import StreamedMixedModel

        streamed = target._device_target
        target._streamed_mixed = StreamedMixedModel(
            target._mixed_host, target.manager,
            [(b.obs_lo, b.obs_hi) for b in streamed.batches if b.n_obs],
            len(streamed._streams), lambda a: target._upload(a, "parameters"))
    # the job's other passes learn that its layout does not fit: the expansion streams its
    # chunks (batch-sized, nothing kept resident) instead of keeping its inputs on the device
    from .cuda_job_table import current_job_table

    current_job_table().stream_rows = int(batch_size)
    # one-element stand-ins for the optional inputs a batch does not have
    target._placeholder = cuda.to_device(np.zeros(1))
    target._placeholder_2d = cuda.to_device(np.zeros((1, 1)))
    target._placeholder_int = cuda.to_device(np.zeros(1, np.int32))
    return True


def evaluate(target, x):
    """(Phi, gradient over the ELL columns) of the host-resident layout at free vector x."""
    launch = model_launcher(target, x)  # first: a host model may rebuild the batches
    _count_streamed_copies(target, with_gradient_entries=True)
    return target._device_target.evaluate(launch)


def _count_streamed_copies(target, with_gradient_entries):
    """Every call copies the whole layout up again, batch by batch: counted in the job
    table (pass "scaling target", role "streamed batches")."""
    streamed = target._device_target
    n_bytes = sum(int(a.nbytes) for a in streamed.host.values())
    if target._kind == "mixed":  # every family's inputs and batch positions
        n_bytes += target._streamed_mixed.host_bytes()
    for batch in streamed.batches:
        n_bytes += int(batch.host["group_start"].nbytes)
        if with_gradient_entries:
            n_bytes += int(batch.host["entry_flat"].nbytes + batch.host["entry_offset"].nbytes)
    if not with_gradient_entries:  # the normal pass's free column of each slot instead
        n_bytes += int(streamed.n_obs * streamed.n_slots * 8)
    with target._store.counting("scaling target"):
        target._store._count("observations", n_bytes, "streamed batches")


def normal_equations(target, x):
    """(Phi, J^T W r, J^T W J) over the free parameters of the host-resident layout at x,
    on the device over the streamed batches (kernels.cuda.streamed_normal)."""
    from dials_vmerge.kernels.cuda.streamed_normal import StreamedNormalEquations

    launch = model_launcher(target, x)  # first: a host model may rebuild the batches
    if getattr(target, "_streamed_normal", None) is None:
        target._streamed_normal = StreamedNormalEquations(
            target._device_target, target.normal_free_columns(), target.n_par)
    _count_streamed_copies(target, with_gradient_entries=False)
    return target._streamed_normal.evaluate(launch)


def model_launcher(target, x):
    """launch(stream, inputs, g, deriv): the model kernel of one streamed batch at x (the
    parameters go up once, here; a mixed job's families' kernels and scatter, their rows of
    the batch copied on its stream); a host-evaluated model's g and dg/dp are evaluated here
    and each batch's rows copied up on its stream."""
    tpb = device_models.THREADS_PER_BLOCK
    if target._kind == "host-model":
        g_host, values, cols = target._ell(x)
        if not np.array_equal(cols, target._cols):  # other ELL columns: new batches
            t = target.table
            target._cols = np.ascontiguousarray(cols)
            target._device_target = HostStreamedTarget(
                t.intensity, t.weight, t.group_start, target._cols, target._n_params,
                target._batch_size, {})
            target._streamed_normal = None
        g_host = np.ascontiguousarray(g_host, dtype=np.float64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        with target._store.counting("scaling target"):
            target._store._count("observations", g_host.nbytes + values.nbytes,
                                 "host-model g")

        def launch(stream, v, g, deriv):
            lo, hi = v["rows"]
            g.copy_to_device(g_host[lo:hi], stream=stream)
            deriv.copy_to_device(values[lo:hi], stream=stream)
        return launch
    if target._kind == "mixed":
        # each family's parameters go up once per call, its batch rows per batch
        target.manager.set_free(x)
        with target._store.counting("scaling target"):
            return target._streamed_mixed.launcher(x)
    if target._kind == "array":
        from dials_vmerge.kernels.cuda import array as device_array_model

        target.manager.set_free(x)
        parameters = cuda.to_device(np.concatenate(
            [np.asarray(m.parameter_vector(), dtype=np.float64)
             for m in target.manager.models] + [np.ones(1)]))
        component_start = cuda.to_device(target._component_start_host)

        def launch(stream, v, g, deriv):
            device_array_model.array_model_kernel[device_models.blocks(g.shape[0]), tpb,
                                                  stream](
                v["weights"], v["full_index"], component_start,
                v.get("fixed", target._placeholder), "fixed" in v, parameters, g, deriv)
        return launch
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
