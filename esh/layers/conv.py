"""Depthwise 1-d convolution over sequence-major tensors (batch, L, channels), for the Mamba mixers.

``depthwise_conv(x, weight, bias, left)`` is ``F.conv1d`` with ``groups=channels`` and ``left``
zeros before the sequence and ``K - 1 - left`` after it (``left = K - 1``: causal; ``(K - 1) // 2``:
PyTorch's "same"), computed in the layout the linear projections produce and consume: no
transpose to conv1d's (batch, channels, L), no padded copy. The forward is K shifted
multiply-adds; under autograd it is one ``torch.autograd.Function`` whose backward is K shifted
multiply-adds for the input's gradient and K products summed for the weight's, instead of the
many small slice, select and in-place-view backward ops that autograd records for the shifted
form.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["depthwise_conv"]


def _shift_add(out: Tensor, x: Tensor, w: Tensor, s: int) -> None:
    """out[:, t] += w * x[:, t + s] where t + s is inside the sequence."""
    n = x.shape[1]
    if abs(s) >= n:
        return
    if s < 0:
        out[:, -s:].addcmul_(x[:, : n + s], w)
    else:
        out[:, : n - s].addcmul_(x[:, s:], w)


def _forward(x: Tensor, w: Tensor, bias: Tensor | None, left: int, out: Tensor | None) -> Tensor:
    """out[t] = bias + sum_k w[:, k] x[t + k - left]: the tap at offset 0 first (it covers every
    position), then the others from the nearest past tap outwards, then the future ones."""
    k = w.shape[1]
    out = torch.mul(x, w[:, left], out=out) if bias is None else torch.addcmul(bias, x, w[:, left], out=out)
    for i in list(range(left - 1, -1, -1)) + list(range(left + 1, k)):
        _shift_add(out, x, w[:, i], i - left)
    return out


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, left: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.left, ctx.has_bias = left, bias is not None
        return _forward(x, w, bias, left, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        left, k, n = ctx.left, w.shape[1], x.shape[1]
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        dx = dw = db = None
        if need_x:  # the transposed convolution: each tap shifted the other way
            dx = torch.mul(grad, w[:, left])
            for i in range(k):
                if i != left:
                    _shift_add(dx, grad, w[:, i], left - i)
            dx = dx.to(x.dtype)
        if need_w:  # dw[:, i] = sum over batch and positions of grad[t] x[t + i - left]
            dw = w.new_zeros(w.shape)
            for i in range(k):
                s = i - left
                if abs(s) >= n:
                    continue
                g, xs = (grad[:, -s:], x[:, : n + s]) if s < 0 else (grad[:, : n - s], x[:, s:])
                dw[:, i] = torch.mul(g, xs).sum((0, 1), dtype=dw.dtype)
        if need_b and ctx.has_bias:
            db = grad.sum((0, 1), dtype=w.dtype)
        return dx, dw, db, None


def depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, left: int | None = None, out: Tensor | None = None
) -> Tensor:
    """Depthwise conv of ``x`` (batch, L, channels) with ``weight`` (channels, K) (a Conv1d's
    (channels, 1, K) weight squeezed) and ``bias`` (channels,) or None; ``left`` zeros of padding
    before the sequence (default K - 1: causal) and K - 1 - left after it. The result has
    x's layout (batch, L, channels), in the promoted dtype of ``x`` and the weight (as ``addcmul``
    gives), and is written into ``out`` when given (not under autograd)."""
    k = weight.shape[1]
    left = k - 1 if left is None else left
    recording = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if recording:
        if out is not None:
            raise RuntimeError("depthwise_conv: out= cannot record gradients")
        return _DepthwiseConv.apply(x, weight, bias, left)
    return _forward(x, weight, bias, left, out)
