"""Causal self-attention with rotary positions and a sigmoid output gate (Qiu et al., 2025, "G1").

``out = o_proj(SDPA(q, k, v) * sigmoid(gate_proj(x)))``: the gate is computed from the same
normed input as q, k and v, one value per head and channel (the "elementwise" variant that
Qwen3-Next ships), and multiplies the attention output before the heads are merged and
projected. Attention runs on ``scaled_dot_product_attention``, or on the ``flash-attn`` package
with ``use_flash=True`` when it is installed and the inputs are fp16/bf16 on CUDA.

Decoding with a cache: the module calls ``k, v = cache.update(k, v, layer_idx)`` (esh's
``ESHCache`` and Hugging Face's ``DynamicCache`` both have it) and then attends with a
bottom-right aligned causal mask; SDPA's ``is_causal=True`` is top-left aligned and would let
a single decode query see only the first key.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh._compat import has_module
from esh.errors import InputError

__all__ = ["GatedAttention", "apply_rotary", "rotary_cos_sin"]


def rotary_cos_sin(
    positions: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables (..., head_dim) for integer ``positions`` of shape (T,) or (batch, T),
    in the half-split layout (channel i pairs with i + head_dim/2), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (batch, heads, T, head_dim) by tables of shape (T, head_dim) or (batch, T, head_dim)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _flash_attn_func():
    from flash_attn import flash_attn_func

    return flash_attn_func


class GatedAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        attn_drop: float = 0.0,
        use_flash: bool = False,
    ):
        super().__init__()
        if head_dim is None:
            if d_model % n_heads:
                raise InputError(f"GatedAttention: d_model {d_model} is not divisible by n_heads {n_heads}")
            head_dim = d_model // n_heads
        if head_dim % 2:
            raise InputError(f"GatedAttention: rotary positions need an even head_dim; got {head_dim}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.rope_theta = rope_theta
        self.attn_drop = attn_drop
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.gate_proj = nn.Linear(d_model, inner, bias=False)  # one gate per head and channel
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.use_flash = use_flash
        self._warned_fallback = False
        if use_flash and not has_module("flash_attn"):
            self._warn_fallback("the flash-attn package is not installed (pip install 'esh[flash]')")

    def _warn_fallback(self, why: str) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(f"GatedAttention(use_flash=True): {why}; using scaled_dot_product_attention", stacklevel=3)

    def _can_flash(self, q: Tensor, attn_mask: Tensor | None) -> bool:
        if not self.use_flash:
            return False
        if not has_module("flash_attn"):
            return False  # warned at construction
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            self._warn_fallback(f"flash-attn needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device.type}")
            return False
        return attn_mask is None

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: Any | None = None,
        layer_idx: int = 0,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, T, d_model) -> (batch, T, d_model).

        Args:
            positions: (T,) or (batch, T) token positions for the rotary embedding; default
                ``arange(T)`` shifted by the tokens already in ``cache``.
            cache: an object with ``update(k, v, layer_idx) -> (k_all, v_all)`` and
                ``get_seq_length(layer_idx)``; the new keys/values are appended to it.
            attn_mask: boolean (batch, 1, T, S) mask, True where a query may attend a key (S = keys
                after the cache update); default: causal, bottom-right aligned.
        """
        batch, seqlen, _ = x.shape
        q, k, v, gate = (
            proj(x).view(batch, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj)
        )
        if positions is None:
            past = cache.get_seq_length(layer_idx) if cache is not None else 0
            positions = torch.arange(past, past + seqlen, device=x.device)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        dropout = self.attn_drop if self.training else 0.0
        if self._can_flash(q, attn_mask):
            # flash-attn takes (batch, T, heads, head_dim); its causal mask is bottom-right aligned
            y = _flash_attn_func()(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True
            ).transpose(1, 2)
        else:
            y = self._sdpa(q, k, v, attn_mask, dropout)
        y = y * torch.sigmoid(gate)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seqlen, self.n_heads * self.head_dim))

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> Tensor:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        if q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if q_len == 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
