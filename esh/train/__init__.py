"""The trainer shared by every esh model (and any timm model)."""

from .trainer import DEFAULT_MODEL, TrainConfig, Trainer, train

__all__ = ["DEFAULT_MODEL", "TrainConfig", "Trainer", "train"]
