"""The seed's module path: ``from esh.model import esh_medium`` (everything lives in ``esh.models.esh_lm``)."""

from esh.models.esh_lm import ESHConfig, ESHModel, esh_large, esh_medium, esh_small, esh_tiny

__all__ = ["ESHConfig", "ESHModel", "esh_large", "esh_medium", "esh_small", "esh_tiny"]
