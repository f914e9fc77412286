"""Merging scaled observations: classical, robust (Student-t) and variational (exact Wilson
posterior); merging statistics; half-dataset cross-validation."""

from .api import (  # noqa: F401
    METHODS,
    MergeResult,
    merge_scaled_table,
    selected_methods,
    single_method,
    write_merge_outputs,
)
