"""Training: the vision trainer (``esh train``), the language-model trainer (``esh lm train``)
and the core they share (distributed set-up, the optimisation step, checkpoints, logs,
settings, the output-directory lock)."""

from .lm import LMTrainConfig, LMTrainer
from .trainer import DEFAULT_MODEL, VisionTrainConfig, VisionTrainer, train

__all__ = ["DEFAULT_MODEL", "LMTrainConfig", "LMTrainer", "VisionTrainConfig", "VisionTrainer", "train"]
