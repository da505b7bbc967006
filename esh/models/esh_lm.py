"""ESH LM: a causal language model whose blocks route every token between Mamba and attention.

``Embedding -> N x ESHBlock -> RMSNorm -> LM head (tied to the embedding)``. Each block:

    h = RMSNorm(x);  alpha = TokenRouter(h)                      # one alpha in [0, 1] per token
    x = x + LayerScale(alpha * norm_a(GatedAttention(h)) + (1 - alpha) * norm_s(Mamba(h)))
    x = x + LayerScale(SwitchMoE(RMSNorm(x)))                     # top-1 over SwiGLU experts

``norm_a`` / ``norm_s`` (``branch_norm=True``) are RMSNorms with learnable per-channel weights
on each branch output before the blend, as Hymba does: the SSM output is usually larger than
the attention output, and one alpha per token could only compensate globally.

This file holds the config, the decoding cache, the block and the model, then the size presets.
``esh_tiny()`` / ``esh_small()`` / ``esh_medium()`` / ``esh_large()`` return an **``ESHConfig``**
(build the model with ``ESHModel(esh_small())``); the registered ``esh_lm_small`` /
``esh_lm_medium`` / ``esh_lm_large`` (``esh.create_model("esh_lm_small")``) return the **model**,
as ``esh_vision_small()`` does for vision. What the LMs share (output type, loss, sampling,
``generate``) is in ``esh.models.lm_common``; the Mamba baseline in ``esh.models.mamba_lm``;
``save_pretrained`` / ``from_pretrained`` files in ``esh.models._lm_checkpoint``; parameter
counts in ``esh.info``.

Sizes are counted as **total parameters including the token embedding, the tied head counted
once and every expert counted** (the GPT-2 "124M" / Mamba "130M" convention plus Switch's MoE
convention); ``print_model_size()`` also gives the non-embedding and active-per-token counts.

Generation keeps an ``ESHCache``: attention keys/values per layer, plus the Mamba conv state and
SSM state, so each new token costs O(1) in the SSM path. ``ESHCache`` has the method names of
transformers' ``DynamicCache`` (``update``, ``get_seq_length``, ``get_conv_state``, ...), so the
Hugging Face wrapper (``esh.models.hf_esh``) passes its own cache through the same code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from esh._compat import import_timm
from esh.errors import InputError, is_whole
from esh.info import esh_lm_param_formula, lm_num_parameters, lm_parameters_by_component, print_lm_size
from esh.layers import GatedAttention, Mamba, MoEAux, SwitchMoE
from esh.layers.norm import RMSNorm
from esh.layers.router import TokenRouter
from esh.models import _lm_checkpoint
from esh.models.lm_common import CausalLMMixin, ESHOutput, next_token_loss, run_ssm, sample_next_token
from esh.models.registry import register_model

LayerScale = import_timm().layers.LayerScale

__all__ = [
    "ESHBlock",
    "ESHCache",
    "ESHConfig",
    "ESHModel",
    "ESHOutput",
    "MoEStats",
    "esh_large",
    "esh_lm_param_formula",
    "esh_medium",
    "esh_small",
    "esh_tiny",
    "next_token_loss",
    "sample_next_token",
]

_POSITIVE_INTS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "d_state",
    "d_conv",
    "expand",
    "n_experts",
    "expert_hidden",
    "max_seq_len",
)


@dataclass
class ESHConfig:
    """Architecture of an ESH LM. Round-trips through ``dataclasses.asdict`` / ``ESHConfig(**d)``.

    The defaults are ``esh_medium()``. ``n_heads`` must divide ``d_model`` (head_dim = d_model /
    n_heads, even for the rotary embedding). ``expert_hidden`` is the SwiGLU width of each of the
    ``n_experts`` experts. ``capacity_factor=None`` is dropless MoE; a number caps every expert at
    ``ceil(capacity_factor * tokens / n_experts)`` tokens per forward. ``aux_loss_coef`` and
    ``z_loss_coef`` weight the Switch load-balancing loss and the router z-loss of each layer.
    ``layer_scale_init=None`` disables LayerScale. ``max_seq_len`` is the training context
    (rotary positions themselves have no limit). ``use_checkpoint`` recomputes each block in the
    backward pass (gradient checkpointing).
    """

    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    n_experts: int = 4
    expert_hidden: int = 2048
    capacity_factor: float | None = None
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    router_jitter: float = 0.0
    layer_scale_init: float | None = 0.1
    branch_norm: bool = True
    alpha_init_bias: float = 0.0
    ssm_type: str = "mamba1"
    use_flash: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 1024
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a config read from JSON may hold anything
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise InputError(f"ESHConfig.{f.name} must be true or false; got {value!r}")
            if f.type in ("float", "float | None") and not (
                (value is None and "None" in f.type)
                or (isinstance(value, (int, float)) and not isinstance(value, bool))
            ):
                raise InputError(f"ESHConfig.{f.name} must be a number; got {value!r}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not is_whole(value, 1):
                raise InputError(f"ESHConfig.{name} must be a positive integer; got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise InputError(
                f"ESHConfig: n_heads={self.n_heads} must divide d_model={self.d_model} into an even head_dim "
                "(rotary positions rotate channel pairs)"
            )
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise InputError(f"ESHConfig.dt_rank must be 'auto' or a positive integer; got {self.dt_rank!r}")
        if self.ssm_type not in ("mamba1", "mamba2"):
            raise InputError(f"ESHConfig.ssm_type must be 'mamba1' or 'mamba2'; got {self.ssm_type!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise InputError(f"ESHConfig.capacity_factor must be > 0 or None (dropless); got {self.capacity_factor}")
        if self.layer_scale_init is not None and self.layer_scale_init <= 0:
            raise InputError(f"ESHConfig.layer_scale_init must be > 0 or None; got {self.layer_scale_init}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"ESHConfig.dropout must be in [0, 1); got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ESHConfig:
        """``ESHConfig(**d)`` with a clear error for keys that are not config fields (naming the
        closest fields)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            close = sorted({m for k in unknown for m in difflib.get_close_matches(k, known, n=3)})
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(
                f"ESHConfig: unknown field(s) {', '.join(unknown)}{hint} (the fields: {', '.join(sorted(known))})"
            )
        return cls(**d)


class ESHCache:
    """Decoding state of an ESH LM: per layer the attention keys/values (batch, heads, S,
    head_dim), grown in place, and the SSM conv state and recurrent state.

    Method names and meanings follow transformers' ``DynamicCache`` with ``layer_types =
    ["hybrid"] * n_layers``, so the model code drives either. ``MambaLM`` uses the SSM states
    only. ``max_length`` preallocates room for
    that many tokens (``generate`` knows it); the buffers double when it is exceeded.

    ``static=True`` (needs ``max_length``) keeps every shape fixed, so that a decode step can be
    captured in a CUDA graph: ``update`` writes at ``position`` (a device tensor, advanced by the
    model after each call) and returns the whole ``max_length`` buffers, and the model masks the
    keys past the position instead of slicing them.
    """

    def __init__(self, n_layers: int, max_length: int | None = None, static: bool = False):
        if static and not max_length:
            raise InputError("ESHCache(static=True) needs max_length: the buffers never grow")
        self.n_layers = n_layers
        self.max_length = max_length
        self.static = static
        self.position: Tensor | None = None  # static: tokens cached so far, on the device
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers
        self.conv_states: list[Tensor | None] = [None] * n_layers
        self.recurrent_states: list[Tensor | None] = [None] * n_layers

    def update(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Append (batch, heads, T, head_dim) keys/values; return all of them so far (static: the
        whole buffers, valid up to ``position``)."""
        if self.static:
            return self._update_static(key, value, layer_idx)
        cur = self.lengths[layer_idx]
        new = cur + key.shape[-2]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or new > buf_k.shape[-2]:
            old_cap = 0 if buf_k is None else buf_k.shape[-2]
            cap = max(new, self.max_length or 0, 2 * old_cap)
            shape = (*key.shape[:-2], cap, key.shape[-1])
            new_k, new_v = key.new_empty(shape), value.new_empty(shape)
            if cur:
                new_k[..., :cur, :] = buf_k[..., :cur, :]
                new_v[..., :cur, :] = buf_v[..., :cur, :]
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v = new_k, new_v
        buf_k[..., cur:new, :] = key
        buf_v[..., cur:new, :] = value
        self.lengths[layer_idx] = new
        return buf_k[..., :new, :], buf_v[..., :new, :]

    def _update_static(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        seqlen = key.shape[-2]
        if self.lengths[layer_idx] + seqlen > self.max_length:
            raise InputError(
                f"ESHCache(static=True): {self.lengths[layer_idx]} + {seqlen} tokens do not fit max_length "
                f"{self.max_length}"
            )
        if self.keys[layer_idx] is None:
            shape = (*key.shape[:-2], self.max_length, key.shape[-1])
            self.keys[layer_idx], self.values[layer_idx] = key.new_zeros(shape), value.new_zeros(shape)
        index = self.device_position(key.device) + torch.arange(seqlen, device=key.device)
        self.keys[layer_idx].index_copy_(2, index, key)
        self.values[layer_idx].index_copy_(2, index, value)
        self.lengths[layer_idx] += seqlen  # host bookkeeping; a replayed CUDA graph does not run it
        return self.keys[layer_idx], self.values[layer_idx]

    def device_position(self, device: torch.device) -> Tensor:
        """Static: the number of cached tokens as a 0-d device tensor (created at 0)."""
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
        return self.position

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def add_tokens(self, count: int) -> None:
        """Count ``count`` more cached tokens in every layer, for a model whose layers keep SSM
        states only (``MambaLM``: ``update`` never runs there)."""
        self.lengths = [n + count for n in self.lengths]

    def get_conv_state(self, layer_idx: int) -> Tensor | None:
        return self.conv_states[layer_idx]

    def get_recurrent_state(self, layer_idx: int) -> Tensor | None:
        return self.recurrent_states[layer_idx]

    def update_conv_state(self, conv_state: Tensor, layer_idx: int, conv_kernel_size: int | None = None) -> Tensor:
        """Keep the last ``conv_kernel_size`` columns of (batch, channels, >= K) pre-conv inputs."""
        k = conv_state.shape[-1] if conv_kernel_size is None else conv_kernel_size
        self.conv_states[layer_idx] = conv_state[..., -k:]
        return self.conv_states[layer_idx]

    def update_recurrent_state(self, state: Tensor, layer_idx: int) -> Tensor:
        self.recurrent_states[layer_idx] = state
        return state

    def has_previous_state(self, layer_idx: int | None = None) -> bool:
        return self.conv_states[self.n_layers - 1 if layer_idx is None else layer_idx] is not None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select/reorder the batch rows (beam search)."""
        for store in (self.keys, self.values, self.conv_states, self.recurrent_states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))

    def reset(self) -> None:
        self.__init__(self.n_layers, self.max_length, self.static)


def _build_ssm(config: ESHConfig) -> nn.Module:
    kwargs = dict(d_state=config.d_state, d_conv=config.d_conv, expand=config.expand, dt_rank=config.dt_rank)
    if config.ssm_type == "mamba2":
        from esh.layers.mamba2 import Mamba2

        return Mamba2(config.d_model, **kwargs)
    return Mamba(config.d_model, **kwargs)


class ESHBlock(nn.Module):
    """``x + LS(alpha·Attn(h) + (1 − alpha)·SSM(h))`` with ``h = norm(x)``, then ``x + LS(MoE(norm x))``."""

    def __init__(self, config: ESHConfig, layer_idx: int):
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.layer_idx = layer_idx
        self.norm1 = RMSNorm(d, eps=eps)
        self.router = TokenRouter(d, bias=config.alpha_init_bias)
        self.attn = GatedAttention(
            d, config.n_heads, rope_theta=config.rope_theta, attn_drop=config.dropout, use_flash=config.use_flash
        )
        self.ssm = _build_ssm(config)
        self.attn_norm = RMSNorm(d, eps=eps) if config.branch_norm else nn.Identity()
        self.ssm_norm = RMSNorm(d, eps=eps) if config.branch_norm else nn.Identity()
        ls = config.layer_scale_init
        self.ls1 = LayerScale(d, init_values=ls) if ls is not None else nn.Identity()
        self.norm2 = RMSNorm(d, eps=eps)
        self.moe = SwitchMoE(
            d,
            config.expert_hidden,
            config.n_experts,
            capacity_factor=config.capacity_factor,
            router_jitter=config.router_jitter,
        )
        self.ls2 = LayerScale(d, init_values=ls) if ls is not None else nn.Identity()
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: Any | None = None,
        attn_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, MoEAux]:
        """x (batch, T, d_model) -> (x, alpha (batch, T) float32, MoEAux). ``attn_mask`` and
        ``token_mask`` come from ``padding_masks`` for a padded batch (None: no padding)."""
        h = self.norm1(x)
        alpha = self.router(h)
        attn = self.attn_norm(self.attn(h, positions, cache, self.layer_idx, attn_mask))
        ssm = self.ssm_norm(run_ssm(self.ssm, h, cache, self.layer_idx, token_mask))
        a = alpha.unsqueeze(-1)
        x = x + self.drop(self.ls1(a * attn + (1.0 - a) * ssm))
        moe_out, aux = self.moe(self.norm2(x), token_mask)
        x = x + self.drop(self.ls2(moe_out))
        return x, alpha, aux


def _static_attention_mask(position: Tensor, seqlen: int, max_length: int, padded: Tensor | None) -> Tensor:
    """(batch or 1, 1, T, max_length) bool mask for a static cache: query t (at ``position + t``)
    sees the keys up to itself; a padded batch's mask (over past + T keys) is extended with False."""
    device = position.device
    query = position + torch.arange(seqlen, device=device)
    causal = (torch.arange(max_length, device=device)[None, :] <= query[:, None])[None, None]
    if padded is None:
        return causal
    return causal & F.pad(padded, (0, max_length - padded.shape[-1]), value=False)


class MoEStats(Mapping[str, float]):
    """``ESHOutput.moe_stats``: floats averaged over layers, computed from the layers' tensors when
    first read (one device sync then; none in a forward whose statistics nobody reads).

    ``tensors()`` gives them as 0-dim tensors on the device, without a sync.
    """

    names = ("load_balance_loss", "z_loss", "dropped_fraction", "max_expert_fraction", "alpha_mean")

    def __init__(self, auxes: list[MoEAux], alphas: list[Tensor]):
        self._auxes, self._alphas = auxes, alphas
        self._stacked: Tensor | None = None
        self._values: dict[str, float] | None = None

    def _stack(self) -> Tensor:
        if self._stacked is None:
            auxes, alphas = self._auxes, self._alphas
            with torch.no_grad():
                self._stacked = torch.stack(
                    [
                        torch.stack([a.load_balance_loss.detach() for a in auxes]).mean(),
                        torch.stack([a.z_loss.detach() for a in auxes]).mean(),
                        torch.stack([a.dropped_fraction.float() for a in auxes]).mean(),
                        torch.stack([a.expert_fraction.max() for a in auxes]).mean(),
                        torch.stack([a.detach().mean() for a in alphas]).mean(),
                    ]
                )
            self._auxes = self._alphas = []
        return self._stacked

    def tensors(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self._stack().unbind()))

    def _floats(self) -> dict[str, float]:
        if self._values is None:
            self._values = dict(zip(self.names, self._stack().tolist()))  # one device sync
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._floats()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"MoEStats({self._floats()})"


def _moe_stats(auxes: list[MoEAux], alphas: list[Tensor]) -> Mapping[str, float]:
    return MoEStats(auxes, alphas) if auxes else {}


class ESHModel(CausalLMMixin, nn.Module):
    """The ESH language model; see the module docstring. ``model(input_ids, labels=None) -> ESHOutput``."""

    def __init__(self, config: ESHConfig):
        super().__init__()
        if not isinstance(config, ESHConfig):
            raise InputError(f"ESHModel needs an ESHConfig; got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(ESHBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = config.use_checkpoint
        self.apply(self._init_weights)

    # ---- weights
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 style: normal(0, initializer_range) for embeddings and projections, the residual
        output projections (attention ``o_proj``, Mamba ``out_proj``, expert ``w2``) scaled by
        1/sqrt(2·n_layers); Mamba's own A/D/dt init; Switch's small router init; norms at 1,
        LayerScale at ``layer_scale_init``. Called per module (Hugging Face calls it the same way)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, GatedAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.gate_proj):
                nn.init.normal_(proj.weight, std=std)
            nn.init.normal_(module.o_proj.weight, std=out_std)
        elif isinstance(module, Mamba) or type(module).__name__ == "Mamba2":
            nn.init.normal_(module.in_proj.weight, std=std)
            nn.init.normal_(module.out_proj.weight, std=out_std)
            module.conv1d.reset_parameters()
            if hasattr(module, "x_proj"):
                nn.init.normal_(module.x_proj.weight, std=std)
            module.reset_ssm_parameters()
        elif isinstance(module, SwitchMoE):
            for expert in module.experts:
                nn.init.normal_(expert.w1.weight, std=std)
                nn.init.normal_(expert.w3.weight, std=std)
                nn.init.normal_(expert.w2.weight, std=out_std)
            module.reset_router()
        elif isinstance(module, TokenRouter):  # alpha = sigmoid(alpha_init_bias) for every token at first
            nn.init.zeros_(module.proj.weight)
            nn.init.constant_(module.proj.bias, self.config.alpha_init_bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LayerScale):
            nn.init.constant_(module.gamma, self.config.layer_scale_init)
        elif module is self.lm_head and not self.config.tie_embeddings:
            nn.init.normal_(module.weight, std=std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def new_cache(self, max_length: int | None = None, static: bool = False) -> ESHCache:
        """An empty decoding cache for this model (room for ``max_length`` tokens preallocated;
        ``static``: fixed shapes, for CUDA graphs)."""
        return ESHCache(self.config.n_layers, max_length, static)

    # ---- forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        past_key_values: Any | None = None,
        use_cache: bool = False,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 0,
        position_ids: Tensor | None = None,
    ) -> ESHOutput:
        """Logits (and losses) for ``input_ids`` (batch, T).

        Args:
            labels: (batch, T) targets aligned with ``input_ids`` (they are shifted inside:
                position t predicts ``labels[:, t + 1]``); -100 is ignored (put it at padding).
            past_key_values: an ``ESHCache`` (or a transformers hybrid cache) holding the tokens
                before ``input_ids``; it is updated in place.
            use_cache: create a cache when none is given, and return it.
            attention_mask: (batch, past + T) 1 at real tokens, 0 at padding (left, right or
                anywhere), covering the cached tokens too. Padding reaches neither attention, nor
                the SSM state or conv, nor the MoE: each row gives what it gives alone.
            logits_to_keep: compute logits for the last this many positions only (0 = all).
            position_ids: (batch, T) rotary positions; default: real tokens counted from 0
                (``cumsum(attention_mask) - 1``), or ``past + arange(T)`` without padding.
        """
        cache, past, pads = self._begin_forward(input_ids, labels, past_key_values, use_cache, attention_mask)
        seqlen = input_ids.shape[1]
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or position_ids.shape[-1] != seqlen or position_ids.dim() > 2:
                got = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
                raise InputError(f"position_ids must be (batch, T) or (T,) with T = {seqlen}; got {got}")
            positions = position_ids
        elif pads is not None:
            positions = pads.positions
        else:
            positions = torch.arange(past, past + seqlen, device=input_ids.device)
        attn_mask, token_mask = (pads.attn_mask, pads.token_mask) if pads is not None else (None, None)
        static = getattr(cache, "static", False)
        if static:  # fixed shapes: positions from the device counter, keys past it masked
            position = cache.device_position(input_ids.device)
            if position_ids is None and pads is None:
                positions = position + torch.arange(seqlen, device=input_ids.device)
            attn_mask = _static_attention_mask(position, seqlen, cache.max_length, attn_mask)

        x = self.drop(self.embed_tokens(input_ids))
        alphas, auxes = [], []
        for layer in self.layers:
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x, alpha, aux = checkpoint(layer, x, positions, None, attn_mask, token_mask, use_reentrant=False)
            else:
                x, alpha, aux = layer(x, positions, cache, attn_mask, token_mask)
            alphas.append(alpha)
            auxes.append(aux)
        if static:
            cache.position += seqlen
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        cfg = self.config
        aux_loss = sum(cfg.aux_loss_coef * a.load_balance_loss + cfg.z_loss_coef * a.z_loss for a in auxes)
        ce_loss = loss = None
        if labels is not None:
            if logits_to_keep:
                raise InputError("labels need the logits of every position; do not combine them with logits_to_keep")
            ce_loss = self._next_token_loss(logits, labels)
            loss = ce_loss + aux_loss
        return ESHOutput(
            loss=loss,
            logits=logits,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            alphas=alphas,
            moe_stats=_moe_stats(auxes, alphas),
            past_key_values=cache,
        )

    # ---- sizes (counted in esh.info)
    def num_parameters_by_component(self) -> dict[str, int]:
        """Parameters per component, the tied head counted once (under ``embedding``)."""
        return lm_parameters_by_component(self)

    def num_parameters(self) -> dict[str, int]:
        """``total`` (embedding included, tied head once, every expert), ``non_embedding`` (total
        minus the token embedding and an untied head) and ``active`` per token (total minus the
        experts a token does not visit under top-1 routing)."""
        return lm_num_parameters(self)

    def print_model_size(self) -> dict[str, Any]:
        """Print and return total, non-embedding and active-per-token parameter counts and the
        split per component (total counts the embedding, the tied head once and all experts)."""
        return print_lm_size(self)

    # ---- saving and loading without transformers (esh.models._lm_checkpoint)
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (``asdict`` of the config) and ``model.safetensors`` (a tied head
        stored once) into ``save_directory``, each atomically and with the permissions of the
        user's umask. A new directory is written under a temporary name and renamed into place;
        an existing one keeps its other files (a tokenizer)."""
        return _lm_checkpoint.save_pretrained(self, dataclasses.asdict(self.config), save_directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any
    ) -> ESHModel:
        """Load what ``save_pretrained`` wrote; ``overrides`` replace config fields (e.g.
        ``use_checkpoint=True``) that do not change the weights' shapes. Weights of another
        shape or of a non-floating dtype are refused, naming the key."""
        config_dict = _lm_checkpoint.read_config(directory)
        config = ESHConfig.from_dict({**config_dict, **overrides})
        model = cls(config)
        _lm_checkpoint.load_weights(model, directory, map_location)
        return model


# ---- size presets: each returns an ESHConfig (the registered esh_lm_* builders return models)
def esh_tiny(**overrides: Any) -> ESHConfig:
    """The **config** of a byte-level test/CPU size: d=128, 4 layers, 4 experts of 256, vocab 256
    (about 2.4M parameters); ``ESHModel(esh_tiny())`` builds the model."""
    return ESHConfig.from_dict(
        {
            "vocab_size": 256,
            "d_model": 128,
            "n_layers": 4,
            "n_heads": 2,
            "n_experts": 4,
            "expert_hidden": 256,
            "max_seq_len": 256,
            **overrides,
        }
    )


def esh_small(**overrides: Any) -> ESHConfig:
    """The **config** of an ESH LM of about 125M parameters (127.9M total, 78.4M active per token;
    GPT-2 vocabulary 50304). ``ESHModel(esh_small())`` builds it; ``esh.create_model("esh_lm_small")``
    returns the model directly (as ``esh_vision_small()`` does for vision)."""
    return ESHConfig.from_dict(
        {"d_model": 512, "n_layers": 12, "n_heads": 8, "n_experts": 4, "expert_hidden": 896, **overrides}
    )


def esh_medium(**overrides: Any) -> ESHConfig:
    """The **config** of an ESH LM of about 350M parameters (345.9M total, 176.0M active per token),
    the defaults of ``ESHConfig``; ``ESHModel(esh_medium())`` or ``esh.create_model("esh_lm_medium")``
    builds the model."""
    return ESHConfig.from_dict(
        {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_experts": 4, "expert_hidden": 2048, **overrides}
    )


def esh_large(**overrides: Any) -> ESHConfig:
    """The **config** of an ESH LM of about 500M parameters (499.5M total, 244.8M active per token);
    ``ESHModel(esh_large())`` or ``esh.create_model("esh_lm_large")`` builds the model."""
    return ESHConfig.from_dict(
        {"d_model": 768, "n_layers": 18, "n_heads": 12, "n_experts": 4, "expert_hidden": 2048, **overrides}
    )


def _create_esh_lm(config: ESHConfig, pretrained: bool, checkpoint_path: str | None) -> ESHModel:
    if pretrained:
        raise InputError("no released ESH LM weights exist; train one (esh lm train) and pass checkpoint_path=")
    model = ESHModel(config)
    if checkpoint_path is not None:
        _lm_checkpoint.load_weights(model, checkpoint_path)
    return model


@register_model
def esh_lm_small(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """The ESH LM small **model** (~125M parameters; ``esh_small()`` is its config); ``kwargs`` override
    ``ESHConfig`` fields."""
    return _create_esh_lm(esh_small(**kwargs), pretrained, checkpoint_path)


@register_model
def esh_lm_medium(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """The ESH LM medium **model** (~350M parameters; ``esh_medium()`` is its config); ``kwargs`` override
    ``ESHConfig`` fields."""
    return _create_esh_lm(esh_medium(**kwargs), pretrained, checkpoint_path)


@register_model
def esh_lm_large(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """The ESH LM large **model** (~500M parameters; ``esh_large()`` is its config); ``kwargs`` override
    ``ESHConfig`` fields."""
    return _create_esh_lm(esh_large(**kwargs), pretrained, checkpoint_path)


def __getattr__(name: str) -> Any:
    # ``from esh.models.esh_lm import MambaLM`` keeps working; the baseline imports this module
    if name in ("MambaLM", "MambaLMBlock"):
        from esh.models import mamba_lm

        return getattr(mamba_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
