"""esh: hybrid state-space / attention backbones (ESH-Vision, ESH LM, MambaVision, Vim)."""

from . import ops, runtime
from ._version import __version__
from .models import UnknownModelError, create_model, is_model, list_models, register_model
from .models.esh_lm import ESHConfig, ESHModel, esh_large, esh_medium, esh_small
from .models.esh_vision import ESHVisionBackbone, ESHVisionConfig
from .runtime import tune_cpu_allocator
from .train.lm import Trainer, TrainingConfig

__all__ = [
    "ESHConfig",
    "ESHModel",
    "ESHVisionBackbone",
    "ESHVisionConfig",
    "Trainer",
    "TrainingConfig",
    "UnknownModelError",
    "__version__",
    "create_model",
    "esh_large",
    "esh_medium",
    "esh_small",
    "is_model",
    "list_models",
    "ops",
    "register_model",
    "runtime",
    "tune_cpu_allocator",
]
