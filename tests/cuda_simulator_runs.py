"""Run under NUMBA_ENABLE_CUDASIM=1 by test_cuda_scaling.py: scaling jobs with
compute.device=cuda whose every device target evaluation is shadowed by the CPU target at the
same parameters, and the same jobs on the CPU. Writes the comparisons to an .npz (argv[1]);
all assertions are made by the test.
"""

import copy
import logging
import sys

import dials_vmerge  # noqa: F401  (cctbx before numba)
import iotbx.phil
import numpy as np
from numba import cuda

from dials_vmerge.backends import run_device
from dials_vmerge.cli import load_phil_text
from dials_vmerge.io.expt import ExperimentList
from dials_vmerge.pipeline import run_scaling_job
from dials_vmerge.scaling.target import ScalingTarget, variance_of_g
from dials_vmerge.simulate import simulate_rotation, simulate_stills
from dials_vmerge.kernels.cuda import models as device_models

LOG = logging.getLogger("cuda_simulator_runs")
assert cuda.is_available(), "run with NUMBA_ENABLE_CUDASIM=1"


def scaling_params(*args):
    master = iotbx.phil.parse(load_phil_text(["input", "model", "scaling", "compute", "output"]))
    interpreter = master.command_line_argument_interpreter()
    return master.fetch(sources=[interpreter.process(arg=a) for a in args]).extract()


def physical_g_numpy(fused, parameters):
    """g of the fused physical layout, recomputed with numpy (not the kernels)."""
    r, fp = fused.record, fused.first_param.astype(np.int64)
    s = sum(r[:, 2 + j] * parameters[fp[:, 0] + j] for j in range(3))
    e = np.exp(sum(r[:, 5 + j] * parameters[fp[:, 1] + j] for j in range(3)))
    a = np.ones(r.shape[0])
    if fused.absorption_coefficients is not None:
        first = fused.absorption_first.astype(np.int64)
        for k in range(fused.absorption_coefficients.shape[1]):
            a += fused.absorption_coefficients[:, k] * parameters[first + k]
    f = fused.fixed_factor if fused.fixed_factor is not None else 1.0
    return s * e * a * f


def mixed_simulation():
    """Three sweeps whose automatic models form three families (DIALS's choice per
    experiment): a 69-degree sweep (physical with absorption), a 34.5-degree one (physical
    without: under 60 degrees) and a 0.7-degree one (KB: under 1 degree of rotation). Only
    the scans' oscillation widths are changed: the reflections are those simulated."""
    experiments, table, truth = simulate_rotation(n_obs_target=450, n_sweeps=3,
                                                  model="physical", seed=7)
    experiments = copy.deepcopy(experiments)
    experiments["scan"][0]["oscillation"] = [0.0, 1.0]
    experiments["scan"][2]["oscillation"] = [0.0, 0.01]
    return experiments, table, truth


class Shadow:
    """Per device evaluation: relative differences of Phi, gradient and g to the CPU."""

    def __init__(self):
        self.rows = []  # (phi_rel, grad_rel, g_rel, var_g_rel)
        self.kinds = set()
        self.batches = set()

    def make(self, device, manager, ih_table, nproc=1, batch_size=None, **kwargs):
        target = ORIGINAL(device, manager, ih_table, nproc, batch_size, **kwargs)
        if device != "cuda":
            return target
        cpu = ScalingTarget(manager, ih_table, nproc)
        self.kinds.add(target.kind)
        if target._device_target is not None:
            self.batches.add(len(target._device_target.batches))
        device_call = target.value_and_gradient

        def both(x):
            phi, grad = device_call(x)
            g_dev = target._g.copy_to_host()[:target.n_obs]
            phi_c, grad_c = cpu.value_and_gradient(x)
            if target.kind == "host-model":  # g and dg/dp come from the host models
                g_c, deriv, cols = cpu._ell(x)
                deriv_c = None
            else:
                deriv = target._deriv.copy_to_host()[:target.n_obs]
            if target.kind == "host-model":
                pass
            elif target.kind == "mixed":  # several families: the CPU's ModelFamilies
                g_c, deriv_c, cols = cpu._ell(x)
            elif cpu.family is not None:
                g_c, deriv_c, cols_c = cpu.family.evaluate(x)
                cols = cols_c
            else:
                g_c = physical_g_numpy(cpu.fused, cpu.fused.full_parameters())
                deriv_c = None
                cols = target._cols
            # var(g) with a random symmetric covariance over the ELL columns, CPU vs device
            n_cols = int(cols.max()) + 1 if cols.size else 1
            rng = np.random.default_rng(len(self.rows))
            m = rng.normal(size=(n_cols, n_cols))
            cov = m @ m.T / n_cols
            var_c = variance_of_g(deriv, np.ascontiguousarray(cols, dtype=np.int64), cov)
            var_d = cuda.device_array(max(target.n_obs, 1))
            device_models.variance_of_g_kernel[device_models.blocks(target.n_obs),
                                               device_models.THREADS_PER_BLOCK](
                cuda.to_device(deriv), cuda.to_device(np.ascontiguousarray(cols, np.int64)),
                cuda.to_device(cov), var_d)
            var_d = var_d.copy_to_host()[:target.n_obs]
            scale = max(np.max(np.abs(grad_c)), 1e-300)
            self.rows.append((
                abs(phi - phi_c) / abs(phi_c),
                np.max(np.abs(grad - grad_c)) / scale,
                np.max(np.abs(g_dev - g_c) / np.abs(g_c)),
                np.max(np.abs(var_d - var_c) / np.maximum(np.abs(var_c), 1e-300)),
                0.0 if deriv_c is None else np.max(np.abs(deriv - deriv_c)
                                                   / np.maximum(np.abs(deriv_c), 1e-300)),
            ))
            return phi, grad

        target.value_and_gradient = both
        return target


ORIGINAL = run_device.make_scaling_target


def run(simulation, *args, shadow=None):
    run_device.make_scaling_target = shadow.make if shadow else ORIGINAL
    experiments_dict, table, _ = simulation
    experiments = ExperimentList.from_dict(copy.deepcopy(experiments_dict))
    _, scaled, _ = run_scaling_job(scaling_params(*args), experiments, table.copy(), LOG)
    run_device.make_scaling_target = ORIGINAL
    return np.asarray(scaled["inverse_scale_factor"]), np.asarray(scaled["intensity.scale.value"])


def main(out_path, size, names=()):
    import time

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = {}
    # Small enough for the simulator (it interprets every kernel in Python); the issue's
    # 200-still layout is checked pass by pass in tests/test_cuda_passes.py.
    n_stills, d_min, n_rotation = 20, 8.0, 300
    cases = {
        "kb": (simulate_stills(n_stills=n_stills, d_min=d_min, seed=5), ("model=KB",)),
        # at most two LevMar iterations per full-matrix round (both runs): the simulator
        # interprets the normal-matrix pass element by element, and two iterations already
        # make the covariance, var(g) and the final expansion of a full-matrix job
        "physical": (simulate_rotation(n_obs_target=n_rotation, n_sweeps=2, model="physical",
                                       seed=7),
                     ("model=physical", "scaling_refinery.full_matrix_max_iterations=2")),
    }
    # three model families (auto: physical with absorption, physical without, KB), a
    # full-matrix round included (run only when asked for: ~1 min under the simulator)
    if "mixed" in names:
        cases["mixed"] = (mixed_simulation(), ("scaling_refinery.full_matrix_max_iterations=1",))
    # The array model's device kernels are compared pass by pass in test_cuda_passes.py.
    if names:
        cases = {name: cases[name] for name in names}
    for name, (simulation, options) in cases.items():
        model = options[0]
        t0 = time.perf_counter()
        shadow = Shadow()
        g_gpu, i_gpu = run(simulation, *options, "compute.device=cuda", shadow=shadow)
        print(f"{name}: device run {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        g_cpu, i_cpu = run(simulation, *options, "compute.device=cpu")
        out[f"{name}_shadow"] = np.array(shadow.rows)
        out[f"{name}_kinds"] = np.array(sorted(shadow.kinds))
        out[f"{name}_g"] = np.stack([g_cpu, g_gpu])
        out[f"{name}_i"] = np.stack([i_cpu, i_gpu])
        if name == "kb":
            batched = Shadow()
            g_b, i_b = run(simulation, model, "compute.device=cuda", "compute.gpu.batch_size=50",
                           shadow=batched)
            out["kb_batched_g"] = g_b
            out["kb_batched_i"] = i_b
            out["kb_batched_shadow"] = np.array(batched.rows)
            out["kb_batched_n_batches"] = np.array(sorted(batched.batches))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "small", sys.argv[3:])
