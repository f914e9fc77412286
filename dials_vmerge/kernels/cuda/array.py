"""The array model on the device: g and dg/dp of every observation in one launch.

Twin of dials_vmerge.model.base.product_rule over the array model's smoothed grids
(model.array_grid: decay 2D, absorption 3D, modulation 2D; model.smoother.ell_values): each
component is a linear smoother, value_c = sum_j w_ij p[index_ij] over the component's slots,
and g = prod_c value_c x fixed factor (the analytical correction). Derivatives:
dg/dp[index_ij] = w_ij x prod_{c' != c} value_c' x fixed factor.

Layout (built once per scaling round by backends.cuda_scaling.array_layout): per observation
the smoother weights (n, K) and the parameter index (n, K) into the full parameter vector of
all datasets (every model's parameters concatenated, then a guard entry equal to 1);
component c owns slots component_start[c]:component_start[c + 1] for every observation. A
dataset without component c points one slot with weight 1 at the guard (value 1) and the
others with weight 0, so every observation has the same components. The smoother weights
depend only on the observations' coordinates, so they stay on the device for the round;
each evaluation uploads only the full parameter vector.
"""

from __future__ import annotations

from numba import cuda, float64

# Components of one observation (decay, absorption, modulation and spares): the size of a
# thread-local array, fixed at compile time.
MAX_COMPONENTS = 8


@cuda.jit(device=True)
def _component_values(weights, full_index, component_start, parameters, i, values):
    n_components = component_start.shape[0] - 1
    for c in range(n_components):
        acc = 0.0
        for j in range(component_start[c], component_start[c + 1]):
            acc += weights[i, j] * parameters[full_index[i, j]]
        values[c] = acc
    return n_components


@cuda.jit
def array_model_kernel(weights, full_index, component_start, fixed_factor, has_fixed,
                       parameters, g, deriv_values):
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        values = cuda.local.array(MAX_COMPONENTS, float64)
        n_components = _component_values(weights, full_index, component_start, parameters, i,
                                         values)
        f = 1.0
        if has_fixed:
            f = fixed_factor[i]
        total = 1.0
        for c in range(n_components):
            total *= values[c]
        g[i] = total * f
        for c in range(n_components):
            others = 1.0
            for c2 in range(n_components):
                if c2 != c:
                    others *= values[c2]
            others *= f
            for j in range(component_start[c], component_start[c + 1]):
                deriv_values[i, j] = weights[i, j] * others


@cuda.jit
def array_g_kernel(weights, full_index, component_start, fixed_factor, has_fixed, parameters,
                   g):
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        values = cuda.local.array(MAX_COMPONENTS, float64)
        n_components = _component_values(weights, full_index, component_start, parameters, i,
                                         values)
        total = 1.0
        for c in range(n_components):
            total *= values[c]
        if has_fixed:
            total *= fixed_factor[i]
        g[i] = total
