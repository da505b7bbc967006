"""esh: hybrid state-space / attention backbones (ESH-Vision, ESH LM, MambaVision, Vim).

Short names kept as aliases (defined in ``esh/training.py`` and ``esh/model.py`` only):
``esh.Trainer`` / ``esh.training.Trainer`` is ``esh.train.LMTrainer``,
``esh.TrainingConfig`` / ``esh.training.TrainingConfig`` is
``esh.train.LMTrainConfig`` (its older field names, ``use_amp`` and friends, still work), and
``esh.model`` re-exports the ESH LM (``ESHConfig``, ``ESHModel``, ``esh_medium``, ...).
``esh_small()`` and the other ``esh_<size>()`` return an ``ESHConfig`` (build the model with
``ESHModel(cfg)``), while the vision builders (``esh_vision_small()``, ...) return models.
"""

from . import ops, runtime
from ._version import __version__
from .models import UnknownModelError, create_model, is_model, list_models, register_model
from .models.esh_lm import ESHConfig, ESHModel, esh_large, esh_medium, esh_small
from .models.esh_vision import ESHVisionBackbone, ESHVisionConfig
from .runtime import tune_cpu_allocator
from .train import LMTrainConfig, LMTrainer, VisionTrainConfig, VisionTrainer
from .training import Trainer, TrainingConfig

__all__ = [
    "ESHConfig",
    "ESHModel",
    "ESHVisionBackbone",
    "ESHVisionConfig",
    "LMTrainConfig",
    "LMTrainer",
    "Trainer",
    "TrainingConfig",
    "UnknownModelError",
    "VisionTrainConfig",
    "VisionTrainer",
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
