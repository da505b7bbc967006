"""Reusable nn.Modules (Mamba mixers, attention, router, MoE) built on ``esh.ops``."""

from .attention import Attention
from .bimamba import BiMambaMixer
from .gated_attention import GatedAttention
from .mamba import Mamba
from .mambavision_mixer import MambaVisionMixer
from .moe import MoEAux, SwiGLU, SwitchMoE

__all__ = [
    "Attention",
    "BiMambaMixer",
    "GatedAttention",
    "Mamba",
    "MambaVisionMixer",
    "MoEAux",
    "SwiGLU",
    "SwitchMoE",
]
