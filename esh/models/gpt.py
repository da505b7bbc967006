"""A small GPT (nanoGPT's ``model.py``): the transformer baseline of the LM benchmarks.

Pre-LayerNorm blocks of causal multi-head attention and a 4x GELU MLP, learned absolute
position embeddings, the LM head tied to the token embedding, nanoGPT's initialisation
(normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer)). Its forward follows the
ESH LM contract, so one trainer and one benchmark serve both: ``model(input_ids, labels=None)``
returns logits and, with labels, the next-token cross-entropy (labels are shifted inside, as in
Hugging Face; ``-100`` is ignored). ``generate`` is the one of every esh LM
(``esh.models.lm_common``), decoding with a preallocated key/value cache (``GPTCache``).

Parameter counts follow nanoGPT's ``get_num_params``: the position table is left out of the
headline count (it is reported as embedding, like the tied token table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError, is_whole
from esh.models.lm_common import CausalLMMixin, ESHOutput

__all__ = ["GPT", "GPTCache", "GPTConfig"]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256  # longest input (position-table rows)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_whole(value, 1):
                raise InputError(f"GPTConfig.{name} must be a positive integer; got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"GPTConfig.dropout must be in [0, 1); got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise InputError(f"n_embd ({cfg.n_embd}) must divide by n_head ({cfg.n_head})")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, pos: int = 0) -> Tensor:
        """(B, T, C) -> (B, T, C). With ``cache`` (k, v buffers (B, H, max_len, hd)), the new keys
        and values are written at ``pos:pos+T`` and the queries attend to everything up to them."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        mask, causal = None, True
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
            if pos > 0:  # SDPA's is_causal is top-left aligned; queries sit at the end here
                causal = False
                mask = None if T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPTCache:
    """Decoding state of a ``GPT``: per block key and value buffers (batch, heads, max_length,
    head_dim), allocated at the first call (when the batch size is known), and the number of
    tokens written into them."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.buffers: list[tuple[Tensor, Tensor]] | None = None
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class GPT(CausalLMMixin, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The token table under the name the other esh LMs use (nanoGPT calls it ``wte``)."""
        return self.wte

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, the tied head counted once; ``non_embedding`` leaves out both tables."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() - self.wpe.weight.numel() if non_embedding else n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_generate_length(self, total: int) -> None:
        if total > self.config.block_size:
            raise InputError(f"GPT: {total} tokens in all exceed block_size {self.config.block_size}")

    def new_cache(self, max_length: int | None = None, static: bool = False) -> GPTCache:
        """An empty key/value cache with room for ``max_length`` tokens (default and at most:
        ``block_size``, the rows of the position table)."""
        if static:
            raise InputError("GPT has no decoding cache of fixed shapes for static_cache/cuda_graph (ESHModel has)")
        max_length = self.config.block_size if max_length is None else max_length
        self._check_generate_length(max_length)
        return GPTCache(max_length)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        past_key_values: GPTCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        attention_mask: Tensor | None = None,
    ) -> ESHOutput:
        """Logits (and the loss) for ``input_ids`` (batch, T), as ``ESHModel.forward``:
        ``past_key_values`` (from ``new_cache``) holds the tokens before ``input_ids`` and is
        updated in place; ``use_cache`` makes one when none is given. Padded batches
        (``attention_mask``) are not supported."""
        if attention_mask is not None:
            raise InputError("GPT takes no attention_mask: it has no support for padded batches")
        self._check_input_ids(input_ids, labels)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        batch, seqlen = input_ids.shape
        pos = cache.length if cache is not None else 0
        limit = cache.max_length if cache is not None else self.config.block_size
        if pos + seqlen > limit:
            raise InputError(
                f"GPT: input of {pos + seqlen} tokens is longer than "
                f"{'the cache' if cache is not None else 'block_size'} ({limit})"
            )
        if cache is not None and cache.buffers is None:
            cache.buffers = self.allocate_inference_cache(batch, cache.max_length)
        x = self._embed(input_ids, pos)
        for i, block in enumerate(self.h):
            if cache is not None:
                x = block(x, cache.buffers[i], pos)
            elif self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.length += seqlen
        x = self.ln_f(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        out = ESHOutput(loss=None, logits=logits, aux_loss=logits.new_zeros((), dtype=torch.float32))
        out.past_key_values = cache
        if labels is not None:
            out.ce_loss = out.loss = self._next_token_loss(logits, labels)
        return out

    def _embed(self, input_ids: Tensor, pos: int) -> Tensor:
        positions = torch.arange(pos, pos + input_ids.shape[1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int) -> list[tuple[Tensor, Tensor]]:
        """Per block, key and value buffers (batch, heads, max_seqlen, head_dim)."""
        p = self.wte.weight
        shape = (batch_size, self.config.n_head, max_seqlen, self.config.n_embd // self.config.n_head)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.h]
