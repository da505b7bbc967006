"""An alias module of the ESH LM: ``from esh.model import ESHModel, esh_medium`` (defined in
``esh.models.esh_lm``). ``esh_tiny()`` ... ``esh_large()`` return an ``ESHConfig``; build the
model with ``ESHModel(esh_medium())``."""

from esh.models.esh_lm import ESHConfig, ESHModel, esh_large, esh_medium, esh_small, esh_tiny

__all__ = ["ESHConfig", "ESHModel", "esh_large", "esh_medium", "esh_small", "esh_tiny"]
