"""The kernel layer of the flat scaling engine: imports with numpy and numba alone.

One reflection table holds the observations of every dataset. Per row it carries a dataset
index; per dataset, indexed arrays say where its parameters start in one global parameter
vector and which components it has. This package holds that layout (flat.py) and the numba
kernels that evaluate a whole model family over all its datasets in one call (kb_family.py,
physical_family.py for physical and dose_decay, array_family.py; smoother_weights.py holds
the smoother's weight rules they share with dials_vmerge.model), flag rows outside every dataset's valid image ranges in one pass (valid_ranges.py) and
evaluate the error model's profile likelihood (error_model_ml.py).
Nothing here knows about experiments, files or cctbx: dials_vmerge.model describes the
parameters, dials_vmerge.scaling drives the rounds.
"""
