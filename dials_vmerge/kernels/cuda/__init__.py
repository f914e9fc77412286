"""numba.cuda twins of the per-observation passes of the flat engine.

Imports with numpy and numba alone (no cctbx), like the rest of dials_vmerge.kernels.
numba.cuda is imported with these modules: set NUMBA_ENABLE_CUDASIM=1 before the first import
to run them on the CPU simulator. Reductions never use floating-point atomics: per-block or
per-segment partials are written to device arrays and added on the host in a fixed order, so
a result is bitwise reproducible for a given layout.
"""
