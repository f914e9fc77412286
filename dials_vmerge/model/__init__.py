"""Scaling models (physical, array, KB) built from components that return g and dg/dp."""

from .array import ArrayScalingModel
from .base import ScalingModel, variance_of_g
from .factory import create_scaling_model, default_model_params, model_from_dict
from .kb_model import KBScalingModel
from .physical import PhysicalScalingModel
from .smoother import initialise_smooth_input

__all__ = [
    "ScalingModel",
    "PhysicalScalingModel",
    "ArrayScalingModel",
    "KBScalingModel",
    "create_scaling_model",
    "model_from_dict",
    "default_model_params",
    "initialise_smooth_input",
    "variance_of_g",
]
