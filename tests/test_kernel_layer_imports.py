"""The kernel layer (flat layout, numba CPU and CUDA kernels) and benchmarks/gpu_check.py run
with numpy and numba alone: a subprocess blocks every cctbx-family import and imports them.
The GPU machines this is measured on have no cctbx."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = ("cctbx", "iotbx", "scitbx", "libtbx", "boost_adaptbx", "dxtbx", "dials.")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.startswith(BLOCKED) or name == "dials":
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(code, *args, timeout=600):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_kernel_layer_imports_and_runs_without_cctbx():
    run = run_blocked(
        """
        import numpy as np
        import dials_vmerge
        from dials_vmerge.kernels import (array_family, flat, kb_family, physical_family,
                                          smoother_weights)
        from dials_vmerge.kernels.cuda import array, merging, models, normal, outliers, target
        from dials_vmerge.kernels.cuda import error_model, families, variational
        from dials_vmerge.kernels import error_model_ml
        from dials_vmerge.kernels import merging as cpu_merging
        from dials_vmerge.backends import cuda_target, select
        from numba import cuda
        try:
            import cctbx  # noqa: F401
            print("cctbx importable: the blocker failed")
        except ImportError:
            pass
        blocked = [m for m in sys.modules if m.split(".")[0] in
                   ("cctbx", "iotbx", "scitbx", "libtbx", "boost_adaptbx", "dxtbx")]
        print("loaded:", blocked)
        # one KB evaluation on the CPU and on the (simulated) device
        row = np.array([0, 1, 1, 0]); s2 = np.array([0.1, 0.2, 0.3, 0.4])
        k = np.array([2.0, 3.0]); b = np.array([-1.0, 0.5])
        g_cpu = kb_family.evaluate_kb_family_g(row, s2, None, k, b)
        g_dev = cuda.device_array(4)
        models.kb_family_g_kernel[1, models.THREADS_PER_BLOCK](
            cuda.to_device(row), cuda.to_device(s2), cuda.to_device(np.ones(1)), False,
            cuda.to_device(k), cuda.to_device(b), g_dev)
        print("max diff", float(np.max(np.abs(g_dev.copy_to_host() - g_cpu))))
        print("numpy recomputation", float(np.max(np.abs(g_cpu - k[row] * np.exp(b[row] * s2)))))
        """)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "cctbx importable: the blocker failed" not in lines
    assert "loaded: []" in lines
    assert "max diff 0.0" in lines
    recomputed = float(lines[-1].split()[-1])
    assert recomputed < 1e-15


def test_gpu_check_runs_without_cctbx_under_the_simulator(tmp_path):
    """benchmarks/gpu_check.py in its simulator mode: every kernel agrees with its CPU twin,
    a timing row per pass and layout, and the JSON says so."""
    import json

    out = tmp_path / "gpu_check.json"
    run = run_blocked(
        """
        import runpy, sys
        sys.argv = ["gpu_check.py"] + sys.argv[1:]
        runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
        """, "--sizes", "300", "--check-size", "500", "--repeats", "1", "--normal-max", "0",
        "--normal-layouts", "physical", "--normal-check-size", "100", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["all_checks_pass"] is True
    assert result["device"]["name"] == "numba CUDA simulator"
    expected = {"model", "model_g", "target_phi", "target_gradient", "merged_intensity",
                "var_g", "merge", "outliers", "merge_classical", "statistics_sums",
                # the error-model sums, expansion, robust/variational merging, streamed batches
                "error_model_ml", "error_model_slope", "error_model_binned", "expand_var_g",
                "merge_robust", "merge_robust_fallback", "merge_variational",
                "evaluation_streamed",
                # the job table's gather, error-model weights and resident outlier mask, and
                # the target over a layout kept in host memory (issue 12)
                "gather", "em_weights", "outliers_resident", "evaluation_host_streamed",
                # a round's table and column entries derived on the device (issue 12): the
                # run's plan and the radix plan (few segments, many columns) forced
                "subset_table", "column_entries_device", "column_entries_radix"}
    for kind in ("kb", "physical", "array"):
        checks = result["checks"][kind]
        # the normal equations are checked on the physical layout only here (the array
        # layout's dense work is too slow for the simulator; tests/test_cuda_passes.py has it)
        names = expected | {"normal"} if kind == "physical" else expected
        assert set(checks) - {"size"} == names
        assert all(checks[name] <= 1e-10 for name in names)
        assert checks["outliers"] == 0  # differing mask entries
        assert checks["merge_robust_fallback"] == 0  # differing fallback flags
        # differing gathered values and mask entries; the host-streamed target has the
        # resident batches' sums bit for bit
        assert checks["gather"] == 0 and checks["outliers_resident"] == 0
        assert checks["evaluation_host_streamed"] == 0
        # differing rows, offsets and entries: the device's integer derivations are exact
        assert checks["subset_table"] == 0 and checks["column_entries_device"] == 0
        assert checks["column_entries_radix"] == 0
    # the layout of two model families (KB and physical rows interleaved): the families'
    # kernels scattered into one table, its target, and the device's split by family
    mixed = result["checks"]["mixed"]
    assert set(mixed) - {"size"} == {"mixed_columns", "mixed_model", "mixed_target_phi",
                                     "mixed_target_gradient", "mixed_split"}
    assert mixed["mixed_columns"] == 0 and mixed["mixed_split"] == 0  # differing entries
    assert all(mixed[name] <= 1e-10 for name in ("mixed_model", "mixed_target_phi",
                                                 "mixed_target_gradient"))
    passes = {(row["layout"], row["pass"]) for row in result["timings"]}
    # 17 passes per layout, the gather and error-model weights, the round's table and
    # column entries, the host-streamed target on the KB and physical layouts, the
    # radix plan's column entries on the KB layout (its run's plan at 300 is one pass) and
    # the mixed layout's model, split and evaluation
    assert len(passes) == 3 * 21 + 2 + 1 + 3
    assert {("mixed", "mixed_model"), ("mixed", "mixed_split"),
            ("mixed", "mixed_evaluation")} <= passes
    assert {("kb", "subset_table"), ("array", "column_entries_device"),
            ("kb", "column_entries_radix")} <= passes
    plans = {(row["layout"], row["pass"]): row["plan"][0] for row in result["timings"]
             if "plan" in row}
    assert plans[("kb", "column_entries_radix")] == "radix"
    assert plans[("kb", "column_entries_device")] == "segments"
    assert {("kb", "evaluation_host_streamed"), ("physical", "evaluation_host_streamed")} <= \
        passes
    assert {"expand", "error_model_ml", "error_model_slope", "error_model_binned",
            "merge_robust", "merge_variational", "evaluation_streamed"} <= {
        p for _, p in passes}
    assert all(row["seconds"] > 0 and row["bound_seconds"] > 0 for row in result["timings"])
