"""Depthwise 1-d convolution over sequence-major tensors (batch, L, channels), for the Mamba mixers.

``depthwise_conv(x, weight, bias, left)`` is ``F.conv1d`` with ``groups=channels`` and ``left``
zeros before the sequence and ``K - 1 - left`` after it (``left = K - 1``: causal; ``(K - 1) // 2``:
PyTorch's "same"), computed in the layout the linear projections produce and consume: no
transpose to conv1d's (batch, channels, L), no padded copy. The forward is K shifted
multiply-adds; under autograd it is one ``torch.autograd.Function`` whose backward is K shifted
multiply-adds for the input's gradient and K products summed for the weight's, instead of the
many small slice, select and in-place-view backward ops that autograd records for the shifted
form.

On the CPU, for float32 tensors whose channels are contiguous, the convolution (and the SiLU the
Mamba mixers apply to it, ``activation="silu"``) runs as one fused C loop each way instead
(``conv_cpu.c``, built with the selective scan's kernel, ``esh.ops.selective_scan.cpu_kernel``):
one pass over the activations where the shifted form makes K, and the backward recomputes the
pre-activation rather than keeping it. Its weight and bias gradients are summed from per-block
partials in a fixed order (the same bits for any number of threads). ``ESH_CPU_KERNEL=0``, other
dtypes and devices use the PyTorch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from esh.errors import InputError

__all__ = ["depthwise_conv"]
ACTIVATIONS = (None, "silu")


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


def _kernel(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None):
    """The C library when it can run these tensors (float32 on the CPU, channels contiguous, no
    tracing: ``cpu_kernel.library_for``), else None."""
    if x.dim() != 3 or x.stride(-1) != 1 or (out is not None and out.stride(-1) != 1):
        return None
    from esh.ops.selective_scan import cpu_kernel

    return cpu_kernel.library_for(x, weight, bias, out)


def _c_forward(lib, x: Tensor, w: Tensor, bias: Tensor | None, left: int, silu: bool, out: Tensor | None) -> Tensor:
    from esh.ops.selective_scan import cpu_kernel

    batch, seqlen, dim = x.shape
    wt = w.t().contiguous()  # (K, channels)
    bias = None if bias is None else bias.contiguous()
    if out is None:
        out = x.new_empty(batch, seqlen, dim)
    lib.esh_dwconv_fwd_f32(
        x.data_ptr(), x.stride(0), x.stride(1), wt.data_ptr(), cpu_kernel.ptr(bias),
        out.data_ptr(), out.stride(0), out.stride(1), batch, seqlen, dim, w.shape[1], left, int(silu),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


class _DepthwiseConvCpu(torch.autograd.Function):
    """The fused C convolution (and SiLU), forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, left: int, silu: bool) -> Tensor:
        from esh.ops.selective_scan import cpu_kernel

        ctx.save_for_backward(x, w, bias)
        ctx.left, ctx.silu = left, silu
        return _c_forward(cpu_kernel.library(), x, w, bias, left, silu, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        from esh.ops.selective_scan import cpu_kernel

        lib = cpu_kernel.library()
        x, w, bias = ctx.saved_tensors
        batch, seqlen, dim = x.shape
        k = w.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.float().contiguous()
        wt = w.t().contiguous()
        items = lib.esh_dwconv_items(batch, seqlen)
        dx = x.new_empty(batch, seqlen, dim) if need_x else None
        dw_part = x.new_empty(items, k, dim)
        db_part = x.new_empty(items, dim) if bias is not None else None
        gpre = torch.empty_like(grad) if ctx.silu else None
        bias = None if bias is None else bias.contiguous()
        lib.esh_dwconv_bwd_f32(
            x.data_ptr(), x.stride(0), x.stride(1), wt.data_ptr(), cpu_kernel.ptr(bias),
            grad.data_ptr(), cpu_kernel.ptr(gpre), cpu_kernel.ptr(dx),
            dw_part.data_ptr(), cpu_kernel.ptr(db_part), batch, seqlen, dim, k, ctx.left,
            int(ctx.silu), torch.get_num_threads(),
        )  # fmt: skip
        dw = db = None
        if need_w:
            dw = cpu_kernel.reduce_partials(lib, dw_part, 1, items).view(k, dim).t()
        if need_b and db_part is not None:
            db = cpu_kernel.reduce_partials(lib, db_part, 1, items).view(dim)
        return dx, dw, db, None, None


def depthwise_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    left: int | None = None,
    out: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Depthwise conv of ``x`` (batch, L, channels) with ``weight`` (channels, K) (a Conv1d's
    (channels, 1, K) weight squeezed) and ``bias`` (channels,) or None; ``left`` zeros of padding
    before the sequence (default K - 1: causal) and K - 1 - left after it; then ``activation``
    (None or ``"silu"``). The result has x's layout (batch, L, channels), in the promoted dtype of
    ``x`` and the weight (as ``addcmul`` gives), and is written into ``out`` when given (not
    under autograd)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"depthwise_conv: activation must be one of {ACTIVATIONS}; got {activation!r}")
    k = weight.shape[1]
    left = k - 1 if left is None else left
    if not 0 <= left < k:
        raise InputError(f"depthwise_conv: left (zeros before the sequence) must be in [0, {k - 1}]; got {left}")
    silu = activation == "silu"
    recording = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if recording and out is not None:
        raise RuntimeError("depthwise_conv: out= cannot record gradients")
    lib = _kernel(x, weight, bias, out)
    if lib is not None:
        if recording:
            return _DepthwiseConvCpu.apply(x, weight, bias, left, silu)
        return _c_forward(lib, x, weight, bias, left, silu, out)
    if recording:
        y = _DepthwiseConv.apply(x, weight, bias, left)
        return F.silu(y) if silu else y
    y = _forward(x, weight, bias, left, out)
    return F.silu(y, inplace=True) if silu else y
