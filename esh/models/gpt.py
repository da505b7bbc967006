"""A small GPT (nanoGPT's ``model.py``): the transformer baseline of the LM benchmarks.

Pre-LayerNorm blocks of causal multi-head attention and a 4x GELU MLP, learned absolute
position embeddings, the LM head tied to the token embedding, nanoGPT's initialisation
(normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer)). Its forward follows the
ESH LM contract, so one trainer and one benchmark serve both: ``model(input_ids, labels=None)``
returns logits and, with labels, the next-token cross-entropy (labels are shifted inside, as in
Hugging Face; ``-100`` is ignored). ``generate`` decodes with a preallocated key/value cache.

Parameter counts follow nanoGPT's ``get_num_params``: the position table is left out of the
headline count (it is reported as embedding, like the tied token table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError
from esh.models.lm_common import ESHOutput, check_generate_args, next_token_loss, sample_next_token

__all__ = ["GPT", "GPTConfig"]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256  # longest input (position-table rows)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


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


class GPT(nn.Module):
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

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, the tied head counted once; ``non_embedding`` leaves out both tables."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() - self.wpe.weight.numel() if non_embedding else n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ESHOutput:
        if input_ids.shape[1] > self.config.block_size:
            raise InputError(
                f"GPT: input of {input_ids.shape[1]} tokens is longer than block_size {self.config.block_size}"
            )
        x = self._embed(input_ids, 0)
        for block in self.h:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        out = ESHOutput(loss=None, logits=logits, aux_loss=logits.new_zeros((), dtype=torch.float32))
        if labels is not None:
            out.ce_loss = out.loss = next_token_loss(logits, labels)
        return out

    def _embed(self, input_ids: Tensor, pos: int) -> Tensor:
        positions = torch.arange(pos, pos + input_ids.shape[1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int) -> list[tuple[Tensor, Tensor]]:
        """Per block, key and value buffers (batch, heads, max_seqlen, head_dim)."""
        p = self.wte.weight
        shape = (batch_size, self.config.n_head, max_seqlen, self.config.n_embd // self.config.n_head)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.h]

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, T) prompt -> (B, T + new) ids. With ``use_cache`` the prompt is run once and every
        new token attends to the cached keys/values; without it the whole sequence is re-run per
        token. Stops early once every sequence has produced ``eos_token_id``. Sampling arguments
        as in ``ESHModel.generate`` (temperature 0 = greedy)."""
        check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p)
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.block_size:
            raise InputError(f"GPT: {total} tokens in all exceed block_size {self.config.block_size}")
        was_training = self.training
        self.eval()
        ids = input_ids
        cache = self.allocate_inference_cache(ids.shape[0], total) if use_cache else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        pos, step_input = 0, ids
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(ids).logits[:, -1]
            else:
                x = self._embed(step_input, pos)
                for block, layer_cache in zip(self.h, cache):
                    x = block(x, layer_cache, pos)
                logits = self.lm_head(self.ln_f(x[:, -1]))
                pos += step_input.shape[1]
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids
