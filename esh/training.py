"""Aliases of the language-model trainer: ``from esh.training import Trainer, TrainingConfig``
gives ``esh.train.LMTrainer`` and ``esh.train.LMTrainConfig`` (the vision trainer is
``esh.train.VisionTrainer``). With ``esh.model``, the one place such aliases are defined."""

from esh.train.lm import LMTrainConfig, LMTrainer, cosine_lr

Trainer = LMTrainer
TrainingConfig = LMTrainConfig

__all__ = ["Trainer", "TrainingConfig", "cosine_lr"]
