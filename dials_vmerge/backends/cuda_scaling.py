"""compute.device=cuda: the scaling target of one minimisation evaluated on the GPU.

CudaScalingTarget is a ScalingTarget whose value_and_gradient runs on the device: the
observation arrays of the minimisation table (I, w, group offsets, the model's per-row
inputs and the gradient's column entries) are copied once, when the target is built for a
scaling round, and stay there; each call uploads the parameters (K, B per dataset, or the
full physical vector) and brings back Phi and the gradient. The minimiser stays on the host.

Model families on the device: the KB family (kernels.cuda.models.kb_family_kernel) and the
fused physical layout (physical_model_kernel). Any other model (array, mixed) evaluates its
ELL Jacobian on the host and uploads g and dg/dp per call; the target sums still run on the
device. The normal matrix of the full-matrix round runs on the CPU (inherited).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from dials_vmerge.kernels.cuda import models as device_models
from dials_vmerge.kernels.cuda.target import DeviceTarget
from dials_vmerge.scaling.target import ScalingTarget

class CudaScalingTarget(ScalingTarget):
    def __init__(self, manager, ih_table, nproc=1, batch_size=None):
        super().__init__(manager, ih_table, nproc)
        t = ih_table
        n = t.n_obs
        self._n = n
        if self.fused is not None:
            f = self.fused
            self._kind = "physical"
            n_abs = 0 if f.absorption_coefficients is None else f.absorption_coefficients.shape[1]
            cols = device_models.physical_columns(f.first_param, f.absorption_first, n_abs)
            self._n_params = f.n_full + 5  # the guard's columns are computed and dropped
            self._record = cuda.to_device(np.ascontiguousarray(f.record))
            self._first_param = cuda.to_device(np.ascontiguousarray(f.first_param))
            self._abs, self._has_abs = device_models.placeholder(f.absorption_coefficients,
                                                                 ndim=2)
            self._abs_first, _ = device_models.placeholder(f.absorption_first, np.int32)
            self._fixed, self._has_fixed = device_models.placeholder(f.fixed_factor)
        elif self.family is not None:
            fam = self.family
            self._kind = "kb"
            cols = device_models.kb_family_columns(fam.row_dataset, fam.scale_col,
                                                   fam.decay_col)
            self._n_params = self.n_par
            self._row_dataset = cuda.to_device(fam.row_dataset)
            self._inv_two_d_sq = cuda.to_device(np.ascontiguousarray(fam.inv_two_d_sq))
            self._fixed, self._has_fixed = device_models.placeholder(fam.fixed_factor)
        else:
            self._kind = "host-model"
            self._n_params = self.n_par
            cols = None
        self._g = cuda.device_array(max(n, 1))
        self._cols = cols
        self._batch_size = batch_size
        self._device_target = None
        if cols is not None:
            self._deriv = cuda.device_array((max(n, 1), cols.shape[1]))
            self._device_target = DeviceTarget(t.intensity, t.weight, t.group_start, cols,
                                               self._n_params, batch_size)

    @property
    def kind(self):
        return self._kind

    def _device_model(self, x):
        """g and dg/dp of every observation into the device buffers."""
        n = self._n
        blocks = device_models.blocks(n)
        tpb = device_models.THREADS_PER_BLOCK
        if self._kind == "kb":
            scale, decay = self.family.parameters(x)
            device_models.kb_family_kernel[blocks, tpb](
                self._row_dataset, self._inv_two_d_sq, self._fixed, self._has_fixed,
                cuda.to_device(scale), cuda.to_device(decay), self._g[:n], self._deriv[:n])
        else:
            self.manager.set_free(x)
            parameters = self.fused.full_parameters()
            device_models.physical_model_kernel[blocks, tpb](
                self._record, self._first_param, self._abs, self._abs_first, self._has_abs,
                self._fixed, self._has_fixed, cuda.to_device(parameters), self._g[:n],
                self._deriv[:n])

    def value_and_gradient(self, x):
        t = self.table
        if self._kind == "host-model":
            g, values, cols = self._ell(x)
            if self._device_target is None or not np.array_equal(cols, self._cols):
                self._cols = cols
                self._device_target = DeviceTarget(t.intensity, t.weight, t.group_start,
                                                   cols, self.n_par, self._batch_size)
            n = self._n
            self._g[:n].copy_to_device(np.ascontiguousarray(g, dtype=np.float64))
            deriv = cuda.to_device(np.ascontiguousarray(values, dtype=np.float64))
            phi, grad = self._device_target.evaluate(self._g[:n], deriv)
        elif self._n == 0:
            phi, grad = 0.0, np.zeros(self.n_par)
        else:
            self._device_model(x)
            phi, grad_cols = self._device_target.evaluate(self._g[:self._n],
                                                          self._deriv[:self._n])
            if self._kind == "physical":
                grad_full = grad_cols[:self.fused.n_full]
                grad = np.zeros(self.n_par)
                # as the CPU path: fixed order of the full entries, shared components add up
                np.add.at(grad, self.full_to_free[self.free_entries],
                          grad_full[self.free_entries])
            else:
                grad = grad_cols
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        grad = grad + 2.0 * wr * x
        self.last_phi = phi
        return phi, grad

