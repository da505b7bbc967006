"""Reusable nn.Modules (Mamba mixers, attention, router, MoE) built on ``esh.ops``."""

from .attention import Attention
from .bimamba import BiMambaMixer
from .mambavision_mixer import MambaVisionMixer

__all__ = ["Attention", "BiMambaMixer", "MambaVisionMixer"]
