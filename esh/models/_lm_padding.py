"""Padded batches for the causal LMs: one 2-D ``attention_mask`` turned into what each path needs.

A padded row must give the tokens it would give alone. Attention gets a boolean mask that hides
padded keys; rotary positions count real tokens only (``cumsum(mask) - 1``, as transformers'
``generate`` does), so a left-padded prompt starts at position 0. The SSM path cannot skip a
position, but a padded input of zero leaves a zero state unchanged: with the padding on the left
(and zeros fed to the conv and the scan there) each row's state at its first real token is the
zero state. Before a whole-sequence scan, each row is therefore reordered so that its padding
comes first and its real tokens follow in order (right padding, or gaps, moved to the left), and
the outputs are put back afterwards: the conv sees real neighbours only, and the final states are
those after each row's last real token, ready for cached decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from esh.errors import InputError

__all__ = ["PaddingMasks", "gather_rows", "padding_first", "padding_masks"]


@dataclass
class PaddingMasks:
    """attn_mask: (batch, 1, T, S) bool, True where a query may attend a key (S = past + T).
    token_mask: (batch, T) bool, True at the real tokens of this call.
    positions: (batch, T) rotary positions of this call's tokens."""

    attn_mask: Tensor
    token_mask: Tensor
    positions: Tensor


def padding_masks(attention_mask: Tensor, past: int, seqlen: int, batch: int) -> PaddingMasks | None:
    """The masks of a padded batch, or None when ``attention_mask`` has no padding at all.

    ``attention_mask`` (batch, past + seqlen) of 0/1 (or bool) covers the cached tokens and this
    call's, as transformers passes it. A padded query attends to itself only, so that no row of
    the attention is empty (its output is never used).
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise InputError(f"attention_mask must be a (batch, past + T) tensor of 0/1; got {got}")
    total = past + seqlen
    if tuple(attention_mask.shape) != (batch, total):
        raise InputError(
            f"attention_mask must be (batch, past + T) = ({batch}, {total}) (the cached tokens and the new "
            f"ones); got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InputError("attention_mask must hold only 0 and 1 (1 = real token, 0 = padding)")
    keys = attention_mask.bool()
    if bool(keys.all()):
        return None
    device = attention_mask.device
    positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    query = torch.arange(seqlen, device=device)[:, None] + past
    key = torch.arange(total, device=device)[None, :]
    causal = key <= query  # (T, S), bottom-right aligned
    attn_mask = (causal & keys[:, None, None, :]) | (key == query)
    return PaddingMasks(attn_mask=attn_mask, token_mask=keys[:, past:], positions=positions)


def padding_first(token_mask: Tensor) -> Tensor | None:
    """Per row, the order (batch, T) that puts the padding first and keeps the real tokens in
    order after it, or None when every row already has its padding first (left padding)."""
    if bool((token_mask[:, 1:] >= token_mask[:, :-1]).all()):
        return None
    return torch.sort(token_mask.to(torch.uint8), dim=1, stable=True).indices


def gather_rows(x: Tensor, order: Tensor) -> Tensor:
    """``x[b, order[b, t]]`` for (batch, T, ...) ``x``; ``gather_rows(y, order.argsort(1))`` undoes it."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)
