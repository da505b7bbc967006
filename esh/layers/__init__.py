"""Reusable nn.Modules (Mamba mixers, attention, router, MoE) built on ``esh.ops``."""
