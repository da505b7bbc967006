"""What the esh causal LMs (``ESHModel``, ``MambaLM``, ``GPT``) share: the output type, the
shifted next-token loss, sampling with its argument checks, the SSM path of a layer with a
decoding cache, and the ``generate`` loop.

A cache here is anything with the method names of transformers' ``DynamicCache`` for hybrid
layers (``get_seq_length``, ``get_conv_state``, ``update_recurrent_state``, ...): esh's own
``ESHCache`` or a transformers cache handed in by the Hugging Face wrapper.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError
from esh.models._lm_padding import gather_rows, padding_first, padding_masks

__all__ = [
    "CausalLMMixin",
    "ESHOutput",
    "check_sampling_args",
    "next_token_loss",
    "run_ssm",
    "sample_next_token",
]


@dataclass
class ESHOutput:
    """What the forward of every esh LM returns.

    loss: ``ce_loss + aux_loss`` when labels were given, else None.
    logits: (batch, T, vocab) (only the last ``logits_to_keep`` positions when that was set).
    ce_loss: next-token cross-entropy (mean over the non-ignored targets), or None without labels.
    aux_loss: sum over layers of ``aux_loss_coef * load_balance + z_loss_coef * z_loss`` (scalar;
        0 for the models without experts).
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


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy predicting labels[:, 1:] from positions [:-1] (Hugging Face's shift),
    ``-100`` ignored, in float32."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line ``InputError`` unless ``temperature`` is a finite number >= 0, ``top_k`` None or an
    integer >= 1 and ``top_p`` None or in (0, 1]."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1, or None for no limit; got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be a number in (0, 1], or None for no limit; got {top_p!r}")


def sample_next_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(batch, vocab) last-position logits -> (batch,) ids: greedy at temperature 0, otherwise
    sampled from the tempered softmax restricted to the ``top_k`` most likely ids and to the
    smallest set whose probability reaches ``top_p`` (nucleus)."""
    check_sampling_args(temperature, top_k, top_p)
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


def check_generate_args(
    input_ids: Any, max_new_tokens: Any, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """The checks of every ``generate``: a non-empty (batch, T) LongTensor prompt, an integer
    ``max_new_tokens >= 0`` and valid sampling arguments."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError("generate: input_ids must be a LongTensor of shape (batch, T)")
    if input_ids.shape[1] == 0:
        raise InputError("generate: the prompt is empty (input_ids has 0 tokens); give at least one token")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    try:
        check_sampling_args(temperature, top_k, top_p)
    except InputError as e:
        raise InputError(f"generate: {e}") from None


def checks_on_device(t: Tensor) -> bool:
    """Whether value checks on ``t`` run asynchronously on its device rather than on the host
    (CUDA, where a host read waits for every queued kernel)."""
    return t.is_cuda


# ---- the SSM path of a layer, with or without a decoding cache
def run_ssm(ssm: nn.Module, h: Tensor, cache: Any | None, layer_idx: int, token_mask: Tensor | None) -> Tensor:
    """``ssm(h)`` for (batch, T, d_model) ``h``. With a cache: the prompt in one scan that leaves
    the final conv and SSM states in the cache (prefill), then token by token from them (decode).
    ``token_mask`` (batch, T) is False at padding, which changes no state."""
    if cache is not None:
        # read both states before writing either (transformers flips has_previous_state on the conv write)
        conv_state, ssm_state = cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)
        if conv_state is not None:
            return _decode_ssm(ssm, h, cache, layer_idx, conv_state, ssm_state, token_mask)
        conv_state, ssm_state = ssm.allocate_inference_cache(h.shape[0], dtype=h.dtype)
    order = padding_first(token_mask) if token_mask is not None else None
    if order is not None:  # padding first, so the scan never crosses it and ends on the last real token
        h, token_mask = gather_rows(h, order), gather_rows(token_mask, order)
    out = ssm(h, mask=token_mask) if cache is None else ssm(h, conv_state, ssm_state, mask=token_mask)
    if order is not None:
        out = gather_rows(out, order.argsort(1))
    if cache is not None:
        cache.update_recurrent_state(ssm_state, layer_idx)
        cache.update_conv_state(conv_state, layer_idx, conv_kernel_size=ssm.d_conv)
    return out


def _decode_ssm(
    ssm: nn.Module,
    h: Tensor,
    cache: Any,
    layer_idx: int,
    conv_state: Tensor,
    ssm_state: Tensor,
    token_mask: Tensor | None,
) -> Tensor:
    """Token by token from the cached states, updated in place; a padded token leaves them as they were."""
    outs = []
    for t in range(h.shape[1]):
        # on CUDA the restore runs whatever the mask holds (a no-op for real tokens) rather than read it
        all_real = token_mask is None or (not checks_on_device(token_mask) and bool(token_mask[:, t].all()))
        keep = None if all_real else ~token_mask[:, t]
        if keep is not None:
            saved = conv_state.clone(), ssm_state.clone()
        outs.append(ssm.step(h[:, t : t + 1], conv_state, ssm_state)[0])
        if keep is not None:
            for state, old in zip((conv_state, ssm_state), saved):
                state.copy_(torch.where(keep.view(-1, *([1] * (state.dim() - 1))), old, state))
        if hasattr(cache, "increase_count"):  # transformers >= 5.25 counts tokens on in-place conv updates
            cache.increase_count(layer_idx, 0)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# ---- generation
def _last_real_index(attention_mask: Tensor) -> Tensor:
    """(batch,) index of each row's last 1 in a (batch, T) mask (0 for a row without one)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, 0).amax(-1)


class _CudaGraphDecode:
    """One cached decode step captured in a CUDA graph on a static cache (``ESHCache(static=True)``)
    and replayed per token: the token is copied into a fixed input buffer, the graph reruns every
    kernel of the step on the same memory (cache buffers, states, position) and the logits land in
    a fixed output buffer. Capturing runs the step three times; the cache is restored afterwards."""

    def __init__(self, model: nn.Module, cache: Any, batch: int):
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


class CausalLMMixin:
    """Input checks and ``generate`` for an LM whose forward takes ``(input_ids, labels=None,
    past_key_values=None, use_cache=False, attention_mask=None, logits_to_keep=0)`` and returns an
    ``ESHOutput``, with an ``embed_tokens`` table and a ``new_cache(max_length, static)`` method."""

    def _check_input_ids(self, input_ids: Tensor, labels: Tensor | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a LongTensor of shape (batch, T); got {got}")
        vocab = self.embed_tokens.num_embeddings
        if input_ids.numel() and input_ids.device.type != "meta":
            if checks_on_device(input_ids):
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

    def _begin_forward(
        self, input_ids: Tensor, labels: Tensor | None, past_key_values, use_cache: bool, attention_mask
    ):
        """What every forward starts with: the ids checked, the cache given (or a new one with
        ``use_cache``), the number of cached tokens, and a padded batch's masks (None without
        ``attention_mask``)."""
        self._check_input_ids(input_ids, labels)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        batch, seqlen = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        pads = padding_masks(attention_mask, past, seqlen, batch) if attention_mask is not None else None
        return cache, past, pads

    _next_token_loss = staticmethod(next_token_loss)

    def _check_generate_length(self, total: int) -> None:
        """Refuse to generate past the model's positions; none by default (rotary and SSM
        positions have no limit)."""

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
        check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p)
        self._check_generate_length(input_ids.shape[1] + max_new_tokens)
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
