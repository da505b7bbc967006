"""``selective_scan`` as one ``torch.library`` operator, for ``torch.compile``.

Dynamo cannot trace the dispatcher (it reads a ContextVar and the environment to pick a
backend) nor every backend (the chunked path caches buffers per inference mode; the C and
Triton kernels are opaque calls), and each of those breaks the graph. Under compilation
``selective_scan`` therefore calls ``esh::selective_scan``: one opaque node with a fake
implementation for shapes, which picks and runs the backend when the graph runs, exactly as an
eager call would. Its gradient is a second operator, ``esh::selective_scan_backward``, that
reruns the chosen backend's forward with autograd on and differentiates it: exact, at the cost
of one more forward per backward (activation checkpointing's trade), and only for compiled code:
eager calls never go through here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["selective_scan_op"]


def _eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend):
    from esh.ops.selective_scan import selective_scan

    return selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state=True,
        backend=backend or None,
        initial_state=initial_state,
    )


def _state_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


@torch.library.custom_op("esh::selective_scan", mutates_args=())
def _scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out, last = _eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend)
    return out.contiguous(), last.contiguous()


@_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend):
    batch, dim, seqlen = u.shape
    dstate = A.shape[-1]
    return u.new_empty((batch, dim, seqlen)), u.new_empty((batch, dim, dstate), dtype=_state_dtype(u))


@torch.library.custom_op("esh::selective_scan_backward", mutates_args=())
def _scan_backward(
    dout: Tensor,
    dlast: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    backend: str,
) -> list[Tensor]:
    """Gradients of every input (an empty tensor for an input that was None)."""
    inputs = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        out, last = _eager(*leaves[:8], delta_softplus, leaves[8], backend)
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((out, last), present, (dout, dlast), allow_unused=True)
    it = iter(grads)
    result = []
    for t in leaves:
        if t is None:
            result.append(u.new_empty(0))
        else:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g.contiguous())
    return result


@_scan_backward.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend):
    inputs = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    return [u.new_empty(0) if t is None else torch.empty_like(t) for t in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    out_shape = u.shape
    if dout is None:
        dout = u.new_zeros(out_shape)
    if dlast is None:
        dlast = u.new_zeros((*out_shape[:2], A.shape[-1]), dtype=_state_dtype(u))
    grads = _scan_backward(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, ctx.backend
    )
    present = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    grads = [None if t is None else g for t, g in zip(present, grads)]
    return (*grads[:8], None, grads[8], None)


_scan.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``selective_scan`` through ``esh::selective_scan`` (same arguments and results)."""
    out, last = torch.ops.esh.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend or ""
    )
    return (out, last) if return_last_state else out
