"""A pure Mamba-1 language model: the SSM baseline of the LM benchmarks.

``Embedding -> n_layers x (x + Mamba(RMSNorm(x))) -> RMSNorm -> LM head (tied)``, the Mamba
paper's LM block (no MLP), with mamba_ssm's initialisation of the residual projections. Its
forward and ``generate`` follow the ESH LM contract (``ESHOutput``; ``aux_loss`` is 0, no
alphas). Decoding keeps each layer's conv and SSM state in an ``ESHCache`` (its attention slots
stay empty), so every new token costs the same whatever the length of the context.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from esh.errors import InputError
from esh.layers import Mamba
from esh.layers.norm import RMSNorm
from esh.models.esh_lm import ESHCache
from esh.models.lm_common import CausalLMMixin, ESHOutput, run_ssm

__all__ = ["MambaLM", "MambaLMBlock"]


class MambaLMBlock(nn.Module):
    """``x + Mamba(RMSNorm(x))``: the Mamba paper's LM block (no MLP)."""

    def __init__(self, d_model: int, layer_idx: int = 0, norm_eps: float = 1e-5, **mamba_kwargs: Any):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = Mamba(d_model, **mamba_kwargs)

    def forward(self, x: Tensor, cache: Any | None = None, token_mask: Tensor | None = None) -> Tensor:
        """(batch, T, d_model) -> same; ``cache`` holds this layer's states before ``x`` and is
        updated in place; ``token_mask`` (batch, T) is False at padding."""
        return x + run_ssm(self.mixer, self.norm(x), cache, self.layer_idx, token_mask)


class MambaLM(CausalLMMixin, nn.Module):
    """Pure Mamba-1 LM baseline: embedding, ``n_layers`` x (RMSNorm + Mamba), RMSNorm, tied head.

    Same forward contract as ``ESHModel`` (``ESHOutput`` with ``loss``/``ce_loss``/``logits``;
    ``aux_loss`` is 0, no alphas). ``generate`` decodes from a recurrent cache (``new_cache``).
    """

    def __init__(
        self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4, expand: int = 2
    ):
        super().__init__()
        if min(vocab_size, d_model, n_layers) < 1:
            raise InputError(f"MambaLM: sizes must be positive; got {vocab_size=}, {d_model=}, {n_layers=}")
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            MambaLMBlock(d_model, i, d_state=d_state, d_conv=d_conv, expand=expand) for i in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        for layer in self.layers:  # GPT-2 / mamba_ssm: scale the residual output projection with depth
            nn.init.normal_(layer.mixer.in_proj.weight, std=0.02)
            nn.init.normal_(layer.mixer.out_proj.weight, std=0.02 / math.sqrt(n_layers))

    def new_cache(self, max_length: int | None = None, static: bool = False) -> ESHCache:
        """An empty decoding cache: per layer the Mamba conv and SSM states (fixed size, so
        ``max_length`` changes nothing)."""
        if static:
            raise InputError(
                "MambaLM has no decoding cache of fixed shapes for static_cache/cuda_graph (ESHModel has); "
                "leave them off: its recurrent cache already costs the same per token"
            )
        return ESHCache(len(self.layers))

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        past_key_values: ESHCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        attention_mask: Tensor | None = None,
    ) -> ESHOutput:
        """Same arguments and output as ``ESHModel.forward``: ``past_key_values`` (from
        ``new_cache``) holds the states after the earlier tokens and is updated in place;
        ``use_cache`` makes one when none is given; a padded batch's ``attention_mask`` is
        (batch, past + T)."""
        cache, _, pads = self._begin_forward(input_ids, labels, past_key_values, use_cache, attention_mask)
        token_mask = pads.token_mask if pads is not None else None
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cache, token_mask)
        if cache is not None:
            cache.add_tokens(input_ids.shape[1])
        x = self.norm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        ce_loss = self._next_token_loss(logits, labels) if labels is not None else None
        zero = logits.new_zeros((), dtype=torch.float32)
        return ESHOutput(loss=ce_loss, logits=logits, ce_loss=ce_loss, aux_loss=zero, past_key_values=cache)
