"""ESH LM: a causal language model whose blocks route every token between Mamba and attention.

``Embedding -> N x ESHBlock -> RMSNorm -> LM head (tied to the embedding)``. Each block:

    h = RMSNorm(x);  alpha = TokenRouter(h)                      # one alpha in [0, 1] per token
    x = x + LayerScale(alpha * norm_a(GatedAttention(h)) + (1 - alpha) * norm_s(Mamba(h)))
    x = x + LayerScale(SwitchMoE(RMSNorm(x)))                     # top-1 over SwiGLU experts

``norm_a`` / ``norm_s`` (``branch_norm=True``) are RMSNorms with learnable per-channel weights
on each branch output before the blend, as Hymba does: the SSM output is usually larger than
the attention output, and one alpha per token could only compensate globally.

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
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from esh._compat import import_timm
from esh.errors import InputError
from esh.layers import GatedAttention, Mamba, MoEAux, SwitchMoE
from esh.layers.router import TokenRouter
from esh.models._checkpoint import CheckpointError, read_checkpoint
from esh.models._lm_padding import gather_rows, padding_first, padding_masks
from esh.models.registry import register_model

LayerScale = import_timm().layers.LayerScale

__all__ = [
    "ESHBlock",
    "ESHCache",
    "ESHConfig",
    "ESHModel",
    "ESHOutput",
    "MambaLM",
    "MoEStats",
    "esh_large",
    "esh_lm_param_formula",
    "esh_medium",
    "esh_small",
    "esh_tiny",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_state", "d_conv", "expand", "n_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ESHConfig.{name} must be a positive integer; got {value!r}")
        if self.expert_hidden < 1:
            raise InputError(f"ESHConfig.expert_hidden must be a positive integer; got {self.expert_hidden!r}")
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
        """``ESHConfig(**d)`` with a clear error for keys that are not config fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"ESHConfig: unknown field(s) {', '.join(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


def esh_lm_param_formula(config: ESHConfig) -> dict[str, int]:
    """Closed-form parameter counts of a Mamba-1 ESH LM (facts: 11d² + 3Edf + ... per block).

    Per block: 2 RMSNorms and 2 LayerScales (4d), the alpha router (d + 1), gated attention
    (5d²), the Mamba mixer (6d² + 2d(K + 2R + 3N + 3) at expand 2, in general 3ed² +
    ed(K + 2R + 3N + 3)), the MoE router (dE) and E SwiGLU experts (3Edf); plus 2d for the
    branch norms. Total adds the embedding V·d (and V·d again for an untied head) and the final
    norm d. Active = total minus the (E − 1) experts a token does not use, in every layer.
    """
    if config.ssm_type != "mamba1":
        raise InputError("esh_lm_param_formula covers ssm_type='mamba1' only")
    d, e, n, k, r = config.d_model, config.expand, config.d_state, config.d_conv, config.resolved_dt_rank
    n_exp, f, n_layers, v = config.n_experts, config.expert_hidden, config.n_layers, config.vocab_size
    di = e * d
    mamba = 3 * di * d + di * (k + 2 * r + 3 * n + 3)
    norms = 2 * d + (2 * d if config.layer_scale_init is not None else 0) + (2 * d if config.branch_norm else 0)
    block = norms + (d + 1) + 5 * d * d + mamba + d * n_exp + 3 * n_exp * d * f
    embedding = v * d * (1 if config.tie_embeddings else 2)
    total = embedding + d + n_layers * block
    return {
        "total": total,
        "non_embedding": total - embedding,
        "active": total - n_layers * (n_exp - 1) * 3 * d * f,
    }


@dataclass
class ESHOutput:
    """What ``ESHModel.forward`` returns.

    loss: ``ce_loss + aux_loss`` when labels were given, else None.
    logits: (batch, T, vocab) (only the last ``logits_to_keep`` positions when that was set).
    ce_loss: next-token cross-entropy (mean over the non-ignored targets), or None without labels.
    aux_loss: sum over layers of ``aux_loss_coef * load_balance + z_loss_coef * z_loss`` (scalar).
    alphas: one (batch, T) float32 tensor of router values per layer (alpha = attention's share).
    moe_stats: floats averaged over layers: ``load_balance_loss`` and ``z_loss`` (unweighted),
        ``dropped_fraction``, ``max_expert_fraction`` (share of tokens of the busiest expert; 1/E
        is perfect balance), ``alpha_mean``; a ``MoEStats`` mapping that reads them from the
        device when first accessed.
    past_key_values: the cache, when one was used.
    """

    loss: Tensor | None
    logits: Tensor
    ce_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    alphas: list[Tensor] = field(default_factory=list)
    moe_stats: Mapping[str, float] = field(default_factory=dict)
    past_key_values: Any | None = None


class ESHCache:
    """Decoding state of an ESH LM: per layer the attention keys/values (batch, heads, S,
    head_dim), grown in place, and the SSM conv state and recurrent state.

    Method names and meanings follow transformers' ``DynamicCache`` with ``layer_types =
    ["hybrid"] * n_layers``, so the model code drives either. ``max_length`` preallocates room for
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
        self.norm1 = nn.RMSNorm(d, eps=eps)
        self.router = TokenRouter(d, bias=config.alpha_init_bias)
        self.attn = GatedAttention(
            d, config.n_heads, rope_theta=config.rope_theta, attn_drop=config.dropout, use_flash=config.use_flash
        )
        self.ssm = _build_ssm(config)
        self.attn_norm = nn.RMSNorm(d, eps=eps) if config.branch_norm else nn.Identity()
        self.ssm_norm = nn.RMSNorm(d, eps=eps) if config.branch_norm else nn.Identity()
        ls = config.layer_scale_init
        self.ls1 = LayerScale(d, init_values=ls) if ls is not None else nn.Identity()
        self.norm2 = nn.RMSNorm(d, eps=eps)
        self.moe = SwitchMoE(
            d,
            config.expert_hidden,
            config.n_experts,
            capacity_factor=config.capacity_factor,
            router_jitter=config.router_jitter,
        )
        self.ls2 = LayerScale(d, init_values=ls) if ls is not None else nn.Identity()
        self.drop = nn.Dropout(config.dropout)

    def _run_ssm(self, h: Tensor, cache: Any | None, token_mask: Tensor | None) -> Tensor:
        if cache is not None:
            i = self.layer_idx
            # read both states before writing either (transformers flips has_previous_state on the conv write)
            conv_state, ssm_state = cache.get_conv_state(i), cache.get_recurrent_state(i)
            if conv_state is not None:
                return self._decode_ssm(h, cache, conv_state, ssm_state, token_mask)
            # prefill: the whole prompt in one scan, keep the final states
            conv_state, ssm_state = self.ssm.allocate_inference_cache(h.shape[0], dtype=h.dtype)
        order = padding_first(token_mask) if token_mask is not None else None
        if order is not None:  # padding first, so the scan never crosses it and ends on the last real token
            h, token_mask = gather_rows(h, order), gather_rows(token_mask, order)
        out = self.ssm(h, mask=token_mask) if cache is None else self.ssm(h, conv_state, ssm_state, mask=token_mask)
        if order is not None:
            out = gather_rows(out, order.argsort(1))
        if cache is not None:
            cache.update_recurrent_state(ssm_state, i)
            cache.update_conv_state(conv_state, i, conv_kernel_size=self.ssm.d_conv)
        return out

    def _decode_ssm(
        self, h: Tensor, cache: Any, conv_state: Tensor, ssm_state: Tensor, token_mask: Tensor | None
    ) -> Tensor:
        """Token by token from the cached states, updated in place; a padded token leaves them as they were."""
        outs = []
        for t in range(h.shape[1]):
            # on CUDA the restore runs whatever the mask holds (a no-op for real tokens) rather than read it
            all_real = token_mask is None or (not _checks_on_device(token_mask) and bool(token_mask[:, t].all()))
            keep = None if all_real else ~token_mask[:, t]
            if keep is not None:
                saved = conv_state.clone(), ssm_state.clone()
            outs.append(self.ssm.step(h[:, t : t + 1], conv_state, ssm_state)[0])
            if keep is not None:
                for state, old in zip((conv_state, ssm_state), saved):
                    state.copy_(torch.where(keep.view(-1, *([1] * (state.dim() - 1))), old, state))
            if hasattr(cache, "increase_count"):  # transformers >= 5.25 counts tokens on in-place conv updates
                cache.increase_count(self.layer_idx, 0)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

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
        ssm = self.ssm_norm(self._run_ssm(h, cache, token_mask))
        a = alpha.unsqueeze(-1)
        x = x + self.drop(self.ls1(a * attn + (1.0 - a) * ssm))
        moe_out, aux = self.moe(self.norm2(x), token_mask)
        x = x + self.drop(self.ls2(moe_out))
        return x, alpha, aux


def sample_next_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(batch, vocab) last-position logits -> (batch,) ids: greedy at temperature 0, otherwise
    sampled from the tempered softmax restricted to the ``top_k`` most likely ids and to the
    smallest set whose probability reaches ``top_p`` (nucleus). Shared by every esh LM."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy predicting labels[:, 1:] from positions [:-1] (Hugging Face's shift),
    ``-100`` ignored, in float32. Shared by every esh LM."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError("generate: input_ids must be a LongTensor of shape (batch, T)")
    if input_ids.shape[1] == 0:
        raise InputError("generate: the prompt is empty (input_ids has 0 tokens); give at least one token")
    if max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"generate: temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"generate: top_k must be >= 1 or None; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"generate: top_p must be in (0, 1] or None; got {top_p}")


def _static_attention_mask(position: Tensor, seqlen: int, max_length: int, padded: Tensor | None) -> Tensor:
    """(batch or 1, 1, T, max_length) bool mask for a static cache: query t (at ``position + t``)
    sees the keys up to itself; a padded batch's mask (over past + T keys) is extended with False."""
    device = position.device
    query = position + torch.arange(seqlen, device=device)
    causal = (torch.arange(max_length, device=device)[None, :] <= query[:, None])[None, None]
    if padded is None:
        return causal
    return causal & F.pad(padded, (0, max_length - padded.shape[-1]), value=False)


def _last_real_index(attention_mask: Tensor) -> Tensor:
    """(batch,) index of each row's last 1 in a (batch, T) mask (0 for a row without one)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, 0).amax(-1)


def _checks_on_device(t: Tensor) -> bool:
    """Whether value checks on ``t`` run asynchronously on its device rather than on the host
    (CUDA, where a host read waits for every queued kernel)."""
    return t.is_cuda


class _CudaGraphDecode:
    """One cached decode step captured in a CUDA graph on a static ``ESHCache`` and replayed per
    token: the token is copied into a fixed input buffer, the graph reruns every kernel of the
    step on the same memory (cache buffers, states, position) and the logits land in a fixed
    output buffer. Capturing runs the step three times; the cache is restored afterwards."""

    def __init__(self, model: nn.Module, cache: ESHCache, batch: int):
        device = cache.position.device
        self.model, self.cache = model, cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        saved = [t.clone() for t in self._tensors()]
        lengths = list(cache.lengths)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as CUDA graphs want
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for t, old in zip(self._tensors(), saved):
            t.copy_(old)
        cache.lengths = lengths

    def _tensors(self) -> list[Tensor]:
        c = self.cache
        return [t for t in (*c.keys, *c.values, *c.conv_states, *c.recurrent_states, c.position) if t is not None]

    def _step(self) -> Tensor:
        return self.model(self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, token: Tensor) -> Tensor:
        self.token.copy_(token[:, None])
        self.graph.replay()
        self.cache.lengths = [n + 1 for n in self.cache.lengths]
        return self.logits


class _CausalLMMixin:
    """``generate`` and label checking shared by ``ESHModel`` and ``MambaLM``."""

    def _check_input_ids(self, input_ids: Tensor, labels: Tensor | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a LongTensor of shape (batch, T); got {got}")
        vocab = self.embed_tokens.num_embeddings
        if input_ids.numel() and input_ids.device.type != "meta":
            if _checks_on_device(input_ids):
                # reading the values would make every forward, each decode step included, wait for
                # the GPU: the check runs there and fails at the next sync (a device-side assert)
                in_range = ((input_ids >= 0) & (input_ids < vocab)).all()
                torch._assert_async(in_range, f"input_ids must lie in [0, {vocab})")
            else:
                low, high = int(input_ids.min()), int(input_ids.max())
                if low < 0 or high >= vocab:
                    raise InputError(f"input_ids must lie in [0, {vocab}); got values in [{low}, {high}]")
        if labels is not None and (labels.shape != input_ids.shape or labels.dtype != torch.long):
            raise InputError(
                f"labels must be a LongTensor shaped like input_ids {tuple(input_ids.shape)}; got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )

    _next_token_loss = staticmethod(next_token_loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None,
        static_cache: bool = False,
        cuda_graph: bool = False,
    ) -> Tensor:
        """Continue ``input_ids`` (batch, T) by up to ``max_new_tokens``; returns (batch, T + new).

        ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature), restricted
        to the ``top_k`` most likely tokens and/or the smallest set with probability >= ``top_p``.
        ``use_cache=True`` runs the prompt once and then one token per step through the cache;
        ``False`` recomputes the whole sequence every step (same tokens, slower). Rows that emitted
        ``eos_token_id`` continue with it; generation stops early once every row has.
        ``attention_mask`` (batch, T) marks a padded batch of prompts (0 = padding, on the left or
        the right): each row then continues as it would alone.
        ``static_cache``: a cache of fixed shapes (preallocated to the final length, keys masked
        instead of sliced); ``cuda_graph`` (CUDA, implies it) captures one decode step in a CUDA
        graph after the prompt and replays it for every token: one launch instead of hundreds.
        """
        _check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p)
        if cuda_graph:
            if not use_cache or attention_mask is not None:
                raise InputError("generate(cuda_graph=True) needs use_cache=True and an unpadded batch")
            if input_ids.device.type != "cuda":
                raise InputError(f"generate(cuda_graph=True) needs CUDA tensors; input_ids are on {input_ids.device}")
            static_cache = True
        was_training = self.training
        self.eval()
        try:
            seq = input_ids
            if max_new_tokens == 0:
                return seq
            cache = None
            if use_cache:
                length = input_ids.shape[1] + max_new_tokens
                cache = self.new_cache(length, static=True) if static_cache else self.new_cache(length)
                if static_cache and cache is None:
                    raise InputError(
                        f"{type(self).__name__} has no decoding cache: static_cache/cuda_graph do not apply"
                    )
            mask = {} if attention_mask is None else {"attention_mask": attention_mask}
            if mask:  # a right-padded row continues from its last real token
                logits = self(seq, past_key_values=cache, use_cache=use_cache, **mask).logits
                last = _last_real_index(attention_mask)
                logits = logits[torch.arange(seq.shape[0], device=seq.device), last]
            else:
                logits = self(seq, past_key_values=cache, use_cache=use_cache, logits_to_keep=1).logits[:, -1]
            finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
            graphed = _CudaGraphDecode(self, cache, seq.shape[0]) if cuda_graph and max_new_tokens > 1 else None
            for i in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                    finished |= token == eos_token_id
                seq = torch.cat([seq, token[:, None]], dim=1)
                if mask:
                    mask["attention_mask"] = F.pad(mask["attention_mask"], (0, 1), value=1)
                if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                    break
                if graphed is not None:
                    logits = graphed(token)
                elif use_cache:
                    logits = self(token[:, None], past_key_values=cache, use_cache=True, **mask).logits[:, -1]
                else:
                    logits = self(seq, logits_to_keep=1, **mask).logits[:, -1]
            return seq
        finally:
            self.train(was_training)


class ESHModel(_CausalLMMixin, nn.Module):
    """The ESH language model; see the module docstring. ``model(input_ids, labels=None) -> ESHOutput``."""

    def __init__(self, config: ESHConfig):
        super().__init__()
        if not isinstance(config, ESHConfig):
            raise InputError(f"ESHModel needs an ESHConfig; got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(ESHBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
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
        self._check_input_ids(input_ids, labels)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        batch, seqlen = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        pads = padding_masks(attention_mask, past, seqlen, batch) if attention_mask is not None else None
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

    # ---- sizes
    def num_parameters_by_component(self) -> dict[str, int]:
        """Parameters per component, the tied head counted once (under ``embedding``)."""
        parts: dict[str, int] = {}
        for name, p in self.named_parameters():  # shared (tied) tensors appear once
            if name.startswith("embed_tokens"):
                key = "embedding"
            elif name.startswith("lm_head"):
                key = "lm_head (untied)"
            elif name.startswith("norm."):
                key = "norms + layerscale"
            else:
                sub = name.split(".")[2]
                key = {
                    "attn": "attention (gated)",
                    "ssm": f"ssm ({self.config.ssm_type})",
                    "router": "alpha router",
                }.get(sub, "norms + layerscale")
                if sub == "moe":
                    key = "moe router" if ".moe.router." in name else "moe experts"
            parts[key] = parts.get(key, 0) + p.numel()
        return parts

    def num_parameters(self) -> dict[str, int]:
        """``total`` (embedding included, tied head once, every expert), ``non_embedding`` (total
        minus the token embedding and an untied head) and ``active`` per token (total minus the
        experts a token does not visit under top-1 routing)."""
        parts = self.num_parameters_by_component()
        total = sum(parts.values())
        expert = sum(p.numel() for p in self.layers[0].moe.experts[0].parameters()) if len(self.layers) else 0
        inactive = len(self.layers) * (self.config.n_experts - 1) * expert
        embedding = parts.get("embedding", 0) + parts.get("lm_head (untied)", 0)
        return {"total": total, "non_embedding": total - embedding, "active": total - inactive}

    def print_model_size(self) -> dict[str, Any]:
        """Print and return total, non-embedding and active-per-token parameter counts and the
        split per component (total counts the embedding, the tied head once and all experts)."""
        counts = self.num_parameters()
        parts = self.num_parameters_by_component()
        cfg = self.config
        lines = [
            f"ESH LM: d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
            f"experts={cfg.n_experts}x{cfg.expert_hidden}, vocab={cfg.vocab_size}, ssm={cfg.ssm_type}",
            f"  total parameters    {counts['total'] / 1e6:10.2f}M  (embedding included, tied head once, all experts)",
            f"  non-embedding       {counts['non_embedding'] / 1e6:10.2f}M",
            f"  active per token    {counts['active'] / 1e6:10.2f}M  (top-1: one expert per token)",
        ]
        for name, n in sorted(parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<20}{n / 1e6:10.2f}M  {100 * n / counts['total']:5.1f}%")
        print("\n".join(lines))
        return {**counts, "components": parts}

    # ---- saving and loading without transformers
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (``asdict`` of the config) and ``model.safetensors`` (a tied head
        stored once) into ``save_directory``, each atomically. A new directory is written under a
        temporary name and renamed into place; an existing one keeps its other files (a tokenizer)."""
        return _save_pretrained(self, dataclasses.asdict(self.config), save_directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any
    ) -> ESHModel:
        """Load what ``save_pretrained`` wrote; ``overrides`` replace config fields (e.g.
        ``use_checkpoint=True``) that do not change the weights' shapes."""
        config_dict = _read_config(directory)
        config = ESHConfig.from_dict({**config_dict, **overrides})
        model = cls(config)
        _load_weights(model, directory, map_location)
        return model


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


def _save_pretrained(model: nn.Module, config_dict: dict, save_directory: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    target = Path(save_directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight

    def write(folder: Path) -> None:
        tmp_w = folder / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
        tmp_c = folder / f".{CONFIG_NAME}.tmp{os.getpid()}"
        try:
            save_file(state, str(tmp_w), metadata={"format": "pt"})
            tmp_c.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_w, folder / WEIGHTS_NAME)  # weights first: config.json marks a complete save
            os.replace(tmp_c, folder / CONFIG_NAME)
        finally:
            tmp_w.unlink(missing_ok=True)
            tmp_c.unlink(missing_ok=True)

    if target.is_dir():
        write(target)
    else:
        if target.exists():
            raise InputError(f"save_pretrained: {target} exists and is not a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
        try:
            write(tmp_dir)
            os.replace(tmp_dir, target)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME} (expected a directory written by save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, expected a JSON object")
    return config


def _load_weights(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
    state = read_checkpoint(path)
    if "model" in state and isinstance(state["model"], Mapping):  # an esh training checkpoint
        state = state["model"]
    tied = getattr(model.config, "tie_embeddings", False)
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    own = model.state_dict()
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{path}: shape mismatch for {bad[0]} (checkpoint {tuple(state[bad[0]].shape)}, model "
            f"{tuple(own[bad[0]].shape)})"
        )
    model.load_state_dict({k: v.to(map_location) for k, v in state.items()}, strict=False)
    model.to(map_location)


# ---------------------------------------------------------------------------------------------
class MambaLMBlock(nn.Module):
    """``x + Mamba(RMSNorm(x))``: the Mamba paper's LM block (no MLP)."""

    def __init__(self, d_model: int, norm_eps: float = 1e-5, **mamba_kwargs: Any):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = Mamba(d_model, **mamba_kwargs)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x + self.mixer(self.norm(x), mask=mask)


class MambaLM(_CausalLMMixin, nn.Module):
    """Pure Mamba-1 LM baseline: embedding, ``n_layers`` x (RMSNorm + Mamba), RMSNorm, tied head.

    Same forward contract as ``ESHModel`` (``ESHOutput`` with ``loss``/``ce_loss``/``logits``;
    ``aux_loss`` is 0, no alphas). Generation recomputes the sequence (no cache).
    """

    def __init__(
        self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4, expand: int = 2
    ):
        super().__init__()
        if min(vocab_size, d_model, n_layers) < 1:
            raise InputError(f"MambaLM: sizes must be positive; got {vocab_size=}, {d_model=}, {n_layers=}")
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            MambaLMBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        for layer in self.layers:  # GPT-2 / mamba_ssm: scale the residual output projection with depth
            nn.init.normal_(layer.mixer.in_proj.weight, std=0.02)
            nn.init.normal_(layer.mixer.out_proj.weight, std=0.02 / math.sqrt(n_layers))

    def new_cache(self, max_length: int | None = None, static: bool = False) -> None:
        return None

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        past_key_values: Any | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        attention_mask: Tensor | None = None,
    ) -> ESHOutput:
        """Same arguments and output as ``ESHModel.forward`` (no cache: ``past_key_values`` must be None;
        a padded batch's ``attention_mask`` is (batch, T))."""
        if past_key_values is not None:
            raise InputError("MambaLM has no decoding cache; call it on the whole sequence")
        self._check_input_ids(input_ids, labels)
        batch, seqlen = input_ids.shape
        pads = padding_masks(attention_mask, 0, seqlen, batch) if attention_mask is not None else None
        mask = order = None
        if pads is not None:  # padding first: the scan then never crosses it
            mask = pads.token_mask
            order = padding_first(mask)
        x = self.embed_tokens(input_ids)
        if order is not None:
            x, mask = gather_rows(x, order), gather_rows(mask, order)
        for layer in self.layers:
            x = layer(x, mask)
        if order is not None:
            x = gather_rows(x, order.argsort(1))
        x = self.norm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        ce_loss = self._next_token_loss(logits, labels) if labels is not None else None
        zero = logits.new_zeros((), dtype=torch.float32)
        return ESHOutput(loss=ce_loss, logits=logits, ce_loss=ce_loss, aux_loss=zero)


# ---------------------------------------------------------------------------------------------
def esh_tiny(**overrides: Any) -> ESHConfig:
    """Byte-level test/CPU size: d=128, 4 layers, 4 experts of 256, vocab 256 (about 2.4M parameters)."""
    return ESHConfig(
        **{
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
    """About 125M parameters (127.9M total, 78.4M active per token; GPT-2 vocabulary 50304)."""
    return ESHConfig(
        **{"d_model": 512, "n_layers": 12, "n_heads": 8, "n_experts": 4, "expert_hidden": 896, **overrides}
    )


def esh_medium(**overrides: Any) -> ESHConfig:
    """About 350M parameters (345.9M total, 176.0M active per token): the seed's main target."""
    return ESHConfig(
        **{"d_model": 768, "n_layers": 12, "n_heads": 12, "n_experts": 4, "expert_hidden": 2048, **overrides}
    )


def esh_large(**overrides: Any) -> ESHConfig:
    """About 500M parameters (499.5M total, 244.8M active per token)."""
    return ESHConfig(
        **{"d_model": 768, "n_layers": 18, "n_heads": 12, "n_experts": 4, "expert_hidden": 2048, **overrides}
    )


def _create_esh_lm(config: ESHConfig, pretrained: bool, checkpoint_path: str | None) -> ESHModel:
    if pretrained:
        raise InputError("no released ESH LM weights exist; train one (esh lm train) and pass checkpoint_path=")
    model = ESHModel(config)
    if checkpoint_path is not None:
        _load_weights(model, checkpoint_path)
    return model


@register_model
def esh_lm_small(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """ESH LM small (~125M parameters); ``kwargs`` override ``ESHConfig`` fields."""
    return _create_esh_lm(esh_small(**kwargs), pretrained, checkpoint_path)


@register_model
def esh_lm_medium(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """ESH LM medium (~350M parameters); ``kwargs`` override ``ESHConfig`` fields."""
    return _create_esh_lm(esh_medium(**kwargs), pretrained, checkpoint_path)


@register_model
def esh_lm_large(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> ESHModel:
    """ESH LM large (~500M parameters); ``kwargs`` override ``ESHConfig`` fields."""
    return _create_esh_lm(esh_large(**kwargs), pretrained, checkpoint_path)
