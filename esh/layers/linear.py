"""``low_rank_linear``: ``F.linear(x, weight)`` for a weight with few input features, as the Mamba
mixers' ``dt_proj`` (dt_rank = d_model / 16 features lifted to every channel), whose training
backward runs as one C loop on the CPU (``lowrank_cpu.c``, built with the selective scan's
kernel, ``esh.ops.selective_scan.cpu_kernel``).

MKL runs the backward's shapes far below its speed on square ones (8 outputs for the input's
gradient; an inner dimension of the token count and 8 columns for the weight's). The C backward
reads the gradient once for both, the weight's summed from per-block partials in a fixed order
(the same bits for any number of threads). The forward stays MKL's: a C loop was no faster
there. Measured in the Mamba LM of ``benchmarks/lm_quality.py``: see the README.

The C path serves float32 CPU tensors while autograd records (training); inference, autocast,
other dtypes and devices, ``ESH_CPU_KERNEL=0`` and torch.compile / FX / JIT tracing use
``F.linear`` alone, so eval-mode results are PyTorch's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["low_rank_linear"]

MAX_RANK = 64  # the backward's per-block weight partial (rank x outputs floats) stays in cache


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """x as (rows, features) (a view where its rows are evenly spaced) and its row stride."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if x2.shape[0] > 1 else x2.shape[1])


class _LowRankLinearCpu(torch.autograd.Function):
    """MKL's forward (as fast as the C loop at these shapes) and the C backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        from esh.ops.selective_scan import cpu_kernel

        lib = cpu_kernel.library()
        x, weight = ctx.saved_tensors
        x2, xs = _rows(x)
        wt = weight.t().contiguous()  # (R, N)
        rows, (n, r) = x2.shape[0], weight.shape
        g2, gs = _rows(grad.float())
        need_x, need_w = ctx.needs_input_grad
        dx = x2.new_empty(rows, r) if need_x else None
        items = lib.esh_lowrank_items(rows)
        dw_part = x2.new_empty(items, r, n) if need_w else None
        lib.esh_lowrank_bwd_f32(
            x2.data_ptr(), xs, wt.data_ptr(), g2.data_ptr(), gs, cpu_kernel.ptr(dx), cpu_kernel.ptr(dw_part),
            rows, n, r, torch.get_num_threads(),
        )  # fmt: skip
        dw = cpu_kernel.reduce_partials(lib, dw_part, 1, items).view(r, n).t() if need_w else None
        return (dx.view(*x.shape[:-1], r) if need_x else None), dw


def _kernel(x: Tensor, weight: Tensor):
    """The C library when it serves this call (see the module docstring), else None."""
    from esh.ops.selective_scan import cpu_kernel

    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return None
    lib = cpu_kernel.library_for(x, weight)  # None first of all while tracing
    if lib is None or torch.is_autocast_enabled(x.device.type):
        return None
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or weight.shape[1] > MAX_RANK:
        return None
    return lib if x.numel() and weight.numel() else None


def low_rank_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for x (..., R) and weight (N, R), with the C loops where
    they apply (see the module docstring)."""
    if _kernel(x, weight) is None:
        return F.linear(x, weight)
    return _LowRankLinearCpu.apply(x, weight)
