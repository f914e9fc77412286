"""What all scaling models share: components in order, the configdict, the parameter vector,
the product rule across components, restraints and the DIALS JSON layout (dials-scaling.md
4.1, 4.10, 5.5, 5.7).

The model's parameter vector is the concatenation of its components' parameters in component
(JSON) order. `evaluate()` returns g = prod_c g_c and the product-rule Jacobian in ELL form,
indexed into that full vector:

    g            (n,)    float64
    deriv_values (n, K)  float64   dg/dp_j = (dg_c/dp_j) * prod_{c' != c} g_c'
    deriv_index  (n, K)  int32     K = sum of the components' ELL widths

JSON: `to_dict()` writes "__id__", one block per component ("n_parameters", "parameters",
"null_parameter_value" and "est_standard_devs" only when ESDs exist) and
"configuration_parameters" (the configdict, key order kept). `is_scaled` (written by DIALS
before December 2020) is accepted on read and not written, as current DIALS does.
"""

from __future__ import annotations

import copy

import numpy as np
from numba import prange

from ..kernels.size_dispatch import parallel_when_large

try:  # libtbx.Auto is how "auto" arrives from a PHIL extract
    from libtbx import Auto as _LIBTBX_AUTO
except ImportError:  # pragma: no cover - cctbx-base is a dependency
    _LIBTBX_AUTO = object()

from ..errors import VmergeError


def is_auto(value) -> bool:
    """True for the ways a PHIL 'auto' can arrive: None, libtbx.Auto, "auto"/"Auto"."""
    if value is None or value is _LIBTBX_AUTO:
        return True
    return isinstance(value, str) and value.lower() == "auto"


def param(params, dotted: str, default=None):
    """params.<dotted> or `default` when any part of the path is missing."""
    node = params
    for part in dotted.split("."):
        if node is None or not hasattr(node, part):
            return default
        node = getattr(node, part)
    return node


@parallel_when_large
def product_rule(component_values, deriv_values, column_start):
    """g = prod_c g_c and each component's derivative columns times the other factors.

    component_values (C, n); deriv_values (n, K) with component c owning the columns
    column_start[c]:column_start[c + 1].
    """
    n_components, n = component_values.shape
    k = deriv_values.shape[1]
    g = np.empty(n)
    out = np.empty((n, k))
    for r in prange(n):
        total = 1.0
        for c in range(n_components):
            total *= component_values[c, r]
        g[r] = total
        for c in range(n_components):
            others = 1.0
            for c2 in range(n_components):
                if c2 != c:
                    others *= component_values[c2, r]
            for j in range(column_start[c], column_start[c + 1]):
                out[r, j] = deriv_values[r, j] * others
    return g, out


@parallel_when_large
def variance_of_g(deriv_values, deriv_index, covariance):
    """diag(J Sigma J^T) per observation: var(g) from the parameter covariance Sigma."""
    n, k = deriv_values.shape
    out = np.empty(n)
    for r in prange(n):
        acc = 0.0
        for a in range(k):
            ja = deriv_values[r, a]
            if ja == 0.0:
                continue
            ia = deriv_index[r, a]
            for b in range(k):
                acc += ja * deriv_values[r, b] * covariance[ia, deriv_index[r, b]]
        out[r] = acc
    return out


def _plain(value):
    """JSON-friendly copy: tuples and arrays become lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class ScalingModel:
    """A collection of components (dict in JSON order) with a DIALS configdict."""

    id_ = None
    consecutive_refinement_order = []
    # the component blocks a model dict can hold, in DIALS's JSON order
    stored_components = ()

    def __init__(self, components: dict, configdict: dict):
        if not configdict.get("corrections"):
            raise VmergeError(f"{self.id_} scaling model: no corrections in the configuration")
        self.components = components
        self.configdict = configdict
        self.fixed_components = []
        self.n_configured = 0

    # -- parameters -----------------------------------------------------------------------
    @property
    def n_parameters(self) -> int:
        return sum(c.n_parameters for c in self.components.values())

    def parameter_slices(self) -> dict:
        """{component name: slice into the full parameter vector}."""
        out, start = {}, 0
        for name, comp in self.components.items():
            out[name] = slice(start, start + comp.n_parameters)
            start += comp.n_parameters
        return out

    def parameter_vector(self) -> np.ndarray:
        if not self.components:
            return np.zeros(0)
        return np.concatenate([c.parameters for c in self.components.values()])

    def set_parameter_vector(self, parameters) -> None:
        parameters = np.asarray(parameters, dtype=np.float64)
        if parameters.shape != (self.n_parameters,):
            raise ValueError(f"expected {self.n_parameters} parameters, got {parameters.shape}")
        for name, sl in self.parameter_slices().items():
            self.components[name].set_parameters(parameters[sl])

    def est_standard_devs_vector(self):
        """All ESDs as one vector, or None if any component has none."""
        esds = [c.est_standard_devs for c in self.components.values() if c.n_parameters]
        if not esds or any(e is None for e in esds):
            return None
        return np.concatenate(esds)

    def set_est_standard_devs(self, esds) -> None:
        """Store ESDs for every component (None clears them)."""
        for name, sl in self.parameter_slices().items():
            comp = self.components[name]
            if esds is None or comp.n_parameters == 0:
                comp.est_standard_devs = None
            else:
                comp.est_standard_devs = np.array(esds[sl], dtype=np.float64)

    @property
    def supports_fix_initial(self) -> bool:
        return False

    def free_parameter_mask(self, fix_initial: bool = False) -> np.ndarray:
        """True for parameters refined: not in a fixed component, and not the first scale
        parameter when `fix_initial` is asked for and this model supports it."""
        mask = np.ones(self.n_parameters, dtype=bool)
        slices = self.parameter_slices()
        for name in self.fixed_components:
            if name in slices:
                mask[slices[name]] = False
        if fix_initial and self.supports_fix_initial and "scale" in slices:
            mask[slices["scale"].start] = False
        return mask

    def restraint_weights(self) -> np.ndarray:
        """Per-parameter weight w of the restraint term sum w p^2 (0 where unrestrained)."""
        parts = []
        for comp in self.components.values():
            w = comp.restraint_weights
            parts.append(np.zeros(comp.n_parameters) if w is None else np.asarray(w, float))
        return np.concatenate(parts) if parts else np.zeros(0)

    def shared_component(self):
        """The component shared between datasets ("absorption") or None."""
        return None

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, rows=None):
        """(g, deriv_values, deriv_index) over the configured observations (or `rows` of them)."""
        values, dvals, dinds, widths = [], [], [], []
        for name, sl in self.parameter_slices().items():
            v, dv, di = self.components[name].evaluate(rows=rows)
            values.append(v)
            dvals.append(dv)
            dinds.append(di.astype(np.int32) + np.int32(sl.start))
            widths.append(dv.shape[1])
        column_start = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        deriv_values = np.ascontiguousarray(np.concatenate(dvals, axis=1))
        deriv_index = np.ascontiguousarray(np.concatenate(dinds, axis=1), dtype=np.int32)
        g, deriv = product_rule(np.ascontiguousarray(np.vstack(values)), deriv_values, column_start)
        return g, deriv, deriv_index

    def evaluate_g(self, rows=None):
        """g alone (no Jacobian): the product of the component values, in component order,
        as `evaluate` forms it (so the two agree bit for bit)."""
        g = None
        for comp in self.components.values():
            v = comp.values(rows=rows)
            g = np.array(v, dtype=np.float64) if g is None else g * v
        if g is None:
            n = self.n_configured if rows is None else len(rows)
            return np.ones(n)
        return g

    # -- configdict bookkeeping -------------------------------------------------------------
    def set_valid_image_range(self, first: int, last: int) -> None:
        self.configdict["valid_image_range"] = [int(first), int(last)]

    def set_error_model(self, model_type: str, parameters) -> None:
        self.configdict["error_model_type"] = model_type
        self.configdict["error_model_parameters"] = [float(p) for p in parameters]

    def record_intensity_combination_Imid(self, imid) -> None:
        self.configdict["Imid"] = imid

    def limit_image_range(self, new_first: int, new_last: int) -> None:
        """Models without a rotation axis (KB) only record the new range."""
        self.set_valid_image_range(new_first, new_last)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"__id__": self.id_}
        for name, comp in self.components.items():
            block = {
                "n_parameters": comp.n_parameters,
                "parameters": comp.parameters.tolist(),
                "null_parameter_value": float(comp.null_parameter_value),
            }
            if comp.est_standard_devs is not None and comp.est_standard_devs.size:
                block["est_standard_devs"] = comp.est_standard_devs.tolist()
            out[name] = block
        out["configuration_parameters"] = _plain(copy.deepcopy(self.configdict))
        return out

    @classmethod
    def from_dict(cls, d: dict, params=None):
        """The model of a DIALS model dict; `params` of a new run then applied by `update`."""
        if d.get("__id__") != cls.id_:
            article = "an" if cls.id_[0] in "aeiou" else "a"
            raise VmergeError(
                f"expected {article} {cls.id_} scaling model, got {d.get('__id__')!r}")
        configdict = copy.deepcopy(d.get("configuration_parameters") or {})
        if "corrections" not in configdict:
            raise VmergeError(f"{cls.id_} scaling model: no corrections in the configuration")
        setups = {
            name: cls._component_setup(d, name)
            for name in cls.stored_components
            if name in configdict["corrections"]
        }
        model = cls(setups, configdict)
        if params is not None:
            model.update(params)
        return model

    def update(self, params) -> None:
        """Apply options of a new run to a model read from a file (DIALS `update`)."""
        raise NotImplementedError

    @staticmethod
    def _add_analytical_correction(configdict: dict, table, scope: str) -> None:
        """Append "analytical" to the corrections; the table, when given, must have the
        column it reads. `scope` names the PHIL scope in the error message."""
        if table is not None and "analytical_correction" not in table:
            raise VmergeError(
                f"{scope}.analytical_correction=True needs the reflection column "
                "'analytical_correction'"
            )
        configdict["corrections"].append("analytical")

    def _configure_analytical(self, table) -> None:
        """Configure the analytical component, if the model has one, from its table column."""
        if "analytical" not in self.components:
            return
        if "analytical_correction" not in table:
            raise VmergeError(
                "the analytical correction needs the reflection column 'analytical_correction'"
            )
        self.components["analytical"].configure(table["analytical_correction"])

    @staticmethod
    def _component_setup(d: dict, name: str):
        """(parameters, esds or None) of component `name` in a model dict."""
        if name not in d:
            raise VmergeError(f"{d.get('__id__')} scaling model: no '{name}' block")
        block = d[name]
        esds = block.get("est_standard_devs")
        return np.array(block["parameters"], dtype=np.float64), (
            None if esds is None else np.array(esds, dtype=np.float64)
        )

    def __str__(self) -> str:
        lines = ["Scaling model:", f"  type : {self.id_}"]
        for name, comp in self.components.items():
            lines.append(f"  {name.capitalize()} component:")
            esds = comp.est_standard_devs
            lines.append("    parameters (sigma)" if esds is not None else "    parameters")
            for i, p in enumerate(comp.parameters):
                text = f"{p:.4f}".rjust(10)
                lines.append(text + (f"   ({esds[i]:.4f})" if esds is not None else ""))
        return "\n".join(lines)
