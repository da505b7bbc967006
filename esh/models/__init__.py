"""Model families, one file each, and the registry their builders live in."""

from ._builder import load_checkpoint
from .registry import UnknownModelError, create_model, is_model, list_models, register_model

__all__ = ["UnknownModelError", "create_model", "is_model", "list_models", "load_checkpoint", "register_model"]

from . import (
    esh_lm,  # noqa: E402,F401  (registers the ESH LM sizes)
    esh_vision,  # noqa: E402,F401  (registers the ESH-Vision variants)
    mambavision,  # noqa: E402,F401  (registers the MambaVision variants)
    vim,  # noqa: E402,F401  (registers the Vision Mamba variants)
)
