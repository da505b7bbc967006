"""The seed's import path for the language-model trainer: ``from esh.training import Trainer,
TrainingConfig`` (the same classes as ``esh.train.lm``; ``esh.train.Trainer`` is the vision trainer)."""

from esh.train.lm import Trainer, TrainingConfig, cosine_lr

__all__ = ["Trainer", "TrainingConfig", "cosine_lr"]
