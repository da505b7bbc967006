"""The seed's import path for the language-model trainer, kept as an alias:
``from esh.training import Trainer, TrainingConfig`` are ``esh.train.LMTrainer`` and
``esh.train.LMTrainConfig`` (the vision trainer is ``esh.train.VisionTrainer``). Every alias of
the seed's names is defined here and in ``esh.model``; ``esh/__init__.py`` lists them."""

from esh.train.lm import LMTrainConfig, LMTrainer, cosine_lr

Trainer = LMTrainer
TrainingConfig = LMTrainConfig

__all__ = ["Trainer", "TrainingConfig", "cosine_lr"]
