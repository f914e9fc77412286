"""Choosing, creating and reading scaling models (DIALS create_scaling_model, 2.1).

`model=auto` (None/Auto): KB when there is no scan, the oscillation width is 0 (stills) or the
rotation range is under 1 degree; physical otherwise. An experiment that already carries a
scaling model is reloaded from it (and updated with the run's options) unless
`overwrite_existing_models` is set.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..errors import VmergeError
from .array import ArrayScalingModel
from .base import ScalingModel, is_auto, param
from .dose_decay import DoseDecayScalingModel
from .kb_model import KBScalingModel
from .physical import PhysicalScalingModel

MODEL_CLASSES = {
    "physical": PhysicalScalingModel,
    "array": ArrayScalingModel,
    "KB": KBScalingModel,
    "dose_decay": DoseDecayScalingModel,
}
KB_MAX_ROTATION_DEG = 1.0


def auto_model_class(experiment):
    from .. import geometry

    if getattr(experiment, "scan", None) is None:
        return KBScalingModel
    first, last = geometry.image_range(experiment)
    _, width = geometry.oscillation(experiment)
    if width == 0.0 or abs((last - first + 1) * width) < KB_MAX_ROTATION_DEG:
        return KBScalingModel
    return PhysicalScalingModel


def model_class(name):
    if name not in MODEL_CLASSES:
        raise VmergeError(
            f"model={name}: not a supported scaling model "
            "(choose physical, array, KB or dose_decay)"
        )
    return MODEL_CLASSES[name]


def model_from_dict(d: dict, params=None) -> ScalingModel:
    """A model from its DIALS JSON dict (one entry of the .expt `scaling_model` list)."""
    model_id = d.get("__id__") if isinstance(d, dict) else None
    if model_id not in MODEL_CLASSES:
        raise VmergeError(f"scaling model type {model_id!r} is not supported "
                          "(physical, array, KB, dose_decay)")
    return MODEL_CLASSES[model_id].from_dict(d, params)


def create_scaling_model(params, experiment, table) -> ScalingModel:
    """The scaling model for one experiment: reloaded from the experiment or made from data."""
    existing = getattr(experiment, "scaling_model", None)
    if existing and not param(params, "overwrite_existing_models", False):
        return model_from_dict(existing, params)
    choice = param(params, "model")
    if is_auto(choice):
        cls = auto_model_class(experiment)
    else:
        cls = model_class(choice)
        if cls is not KBScalingModel and getattr(experiment, "scan", None) is None:
            raise VmergeError(f"model={choice} needs a rotation scan; use model=KB for stills")
    from ..table import ReflectionTable, RowView

    if isinstance(table, ReflectionTable):
        table = RowView(table)  # set-up reads a few columns once: do not keep them in the table
    return cls.from_data(params, experiment, table)


def default_model_params(**overrides) -> SimpleNamespace:
    """The DIALS defaults of the model scopes as a plain namespace (tests, library use)."""

    def ns(**kw):
        return SimpleNamespace(**kw)

    params = ns(
        model=None,
        overwrite_existing_models=False,
        physical=ns(
            scale_correction=True,
            scale_interval=None,
            decay_correction=True,
            decay_interval=None,
            decay_restraint=0.1,
            absorption_correction=None,
            absorption_level=None,
            lmax=None,
            surface_weight=None,
            share=ns(absorption=False),
            fix_initial=True,
            correction=ns(fix=None),
            analytical_correction=False,
        ),
        array=ns(
            decay_correction=True,
            decay_interval=20.0,
            n_resolution_bins=10,
            absorption_correction=True,
            n_absorption_bins=3,
            modulation_correction=False,
            n_modulation_bins=20,
            correction=ns(fix=None),
            analytical_correction=False,
        ),
        KB=ns(decay_correction=True, correction=ns(fix=None), analytical_correction=False),
        dose_decay=ns(
            scale_interval=2.0,
            relative_B_correction=True,
            decay_correction=True,
            share=ns(decay=True),
            resolution_dependence="quadratic",
            absorption_correction=False,
            lmax=4,
            surface_weight=1e6,
            fix_initial=True,
            correction=ns(fix=None),
            analytical_correction=False,
        ),
    )
    for dotted, value in overrides.items():
        node = params
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = getattr(node, part)
        setattr(node, parts[-1], value)
    return params
