"""``RMSNorm``: ``torch.nn.RMSNorm`` (same parameters, state dict and results) whose forward and
backward run as one fused C loop each on the CPU for float32 inputs normalised over their last
dimension (``norm_cpu.c``, built with the selective scan's kernel,
``esh.ops.selective_scan.cpu_kernel``).

PyTorch's CPU RMSNorm is a pow, a mean, an rsqrt and two products forward and about ten
elementwise ops backward, each a pass over the activations; here each direction is one pass
per row. The weight's gradient is summed from per-block partials in a fixed order (the same
bits for any number of threads). Other devices and dtypes, ``ESH_CPU_KERNEL=0``, and
torch.compile, FX or JIT tracing (exports) use ``torch.nn.RMSNorm.forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "fused_applies", "fused_rms_norm", "rms_norm"]


def _lib(x: Tensor, weight: Tensor | None, normalized_shape: tuple[int, ...]):
    from esh.ops.selective_scan import cpu_kernel

    lib = cpu_kernel.library_for(x, weight)  # None first of all while tracing
    if lib is None or len(normalized_shape) != 1 or x.dim() < 1 or x.shape[-1] != normalized_shape[0]:
        return None
    return lib if x.numel() else None


def fused_applies(x: Tensor, weight: Tensor | None) -> bool:
    """Whether ``rms_norm`` over x's last dimension runs the fused CPU kernel for these tensors."""
    return _lib(x, weight, (x.shape[-1],)) is not None


def _forward(lib, x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(y, x and weight as the kernel read them, rstd per row)."""
    from esh.ops.selective_scan import cpu_kernel

    x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    dim = x.shape[-1]
    rows = x.numel() // dim
    y = torch.empty_like(x)
    rstd = x.new_empty(rows)
    lib.esh_rmsnorm_fwd_f32(
        x.data_ptr(), cpu_kernel.ptr(weight), y.data_ptr(), rstd.data_ptr(), rows, dim, eps, torch.get_num_threads()
    )
    return y, x, weight, rstd


class _RMSNormCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        from esh.ops.selective_scan import cpu_kernel

        y, *saved = _forward(cpu_kernel.library(), x, weight, eps)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        from esh.ops.selective_scan import cpu_kernel

        lib = cpu_kernel.library()
        x, weight, rstd = ctx.saved_tensors
        grad = grad.float().contiguous()
        dim = x.shape[-1]
        rows = x.numel() // dim
        dx = torch.empty_like(x)
        items = lib.esh_rmsnorm_items(rows)
        dw_part = x.new_empty(items, dim) if weight is not None else None
        lib.esh_rmsnorm_bwd_f32(
            x.data_ptr(), cpu_kernel.ptr(weight), rstd.data_ptr(), grad.data_ptr(),
            dx.data_ptr(), cpu_kernel.ptr(dw_part), rows, dim, torch.get_num_threads(),
        )  # fmt: skip
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = cpu_kernel.reduce_partials(lib, dw_part, 1, items).view(dim)
        return dx if ctx.needs_input_grad[0] else None, dw, None


def fused_rms_norm(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float | None
) -> Tensor | None:
    """The fused CPU kernel's RMSNorm of ``x``, or None where it does not apply (see the module
    docstring); ``eps=None`` is the input dtype's machine epsilon, as in torch."""
    lib = _lib(x, weight, tuple(normalized_shape))
    if lib is None:
        return None
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNormCpu.apply(x, weight, eps)
    return _forward(lib, x, weight, eps)[0]


@torch.fx.wrap  # one node of an FX graph, which then runs what eager runs
def rms_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float | None) -> Tensor:
    """``torch.nn.functional.rms_norm``, with the fused CPU kernel where it applies."""
    y = fused_rms_norm(x, normalized_shape, weight, eps)
    return nn.functional.rms_norm(x, normalized_shape, weight, eps) if y is None else y


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the fused CPU forward and backward (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
