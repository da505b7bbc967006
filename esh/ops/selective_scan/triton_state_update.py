"""One step of the selective scan as a Triton kernel, for generation on GPUs without mamba_ssm.

One program per (channel block, request, head): it loads the (BLOCK_D, N) slice of the state
into registers, advances it by one step, writes it back in place and writes that step's output.
Decoding is memory-bound and launch-bound, so everything (bias, softplus, skip, gate, the
padding of ``state_batch_indices``) happens in this one launch, and every input is read through
its strides: no ``.contiguous()`` copies of the expanded A/dt/D that Mamba-2 passes.

Same arguments and semantics as ``esh.ops.selective_state_update`` (``reference.py`` is the
specification); shapes are checked there. CPU tensors run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is what the tests use.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference step serves; see is_available()
    triton = None


def is_available() -> bool:
    """Whether triton imports (CUDA tensors can then take this backend)."""
    return triton is not None


def unsupported_reason(device: torch.device) -> str | None:
    """Why this kernel cannot run tensors on ``device``, or None when it can."""
    if triton is None:
        return "selective_state_update: backend 'triton' needs the triton package (it ships with CUDA builds of torch)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreted():
        return None
    if device.type == "cpu":
        return (
            "selective_state_update: backend 'triton' runs CPU tensors only in Triton's interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported; slow, for tests); use backend='reference'"
        )
    return f"selective_state_update: backend 'triton' runs only on CUDA tensors; the inputs are on {device.type}"


def _interpreted() -> bool:
    # triton.jit reads TRITON_INTERPRET once, when the kernel below is decorated
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_state_update_kernel, InterpretedFunction)


if triton is not None:

    @triton.jit
    def _softplus(x):
        # torch's softplus (threshold 20). log1p(u) as log(w) * u / (w - 1), w = 1 + u (Kahan),
        # exact for tiny u, since tl has no log1p that both compiler and interpreter know; the
        # clamp and the guarded division keep the branch not taken free of inf and nan
        u = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + u
        rounded = w == 1.0
        log1p = tl.where(rounded, u, tl.log(w) * (u / tl.where(rounded, 1.0, w - 1.0)))
        return tl.where(x > 20.0, x, log1p)

    @triton.jit
    def _state_update_kernel(
        state_ptr,
        x_ptr,
        dt_ptr,
        dt_bias_ptr,
        A_ptr,
        B_ptr,
        C_ptr,
        D_ptr,
        z_ptr,
        out_ptr,
        indices_ptr,
        dim,
        dstate,
        heads_per_B_group,
        heads_per_C_group,
        s_state_b,
        s_state_h,
        s_state_d,
        s_state_n,
        s_x_b,
        s_x_h,
        s_x_d,
        s_dt_b,
        s_dt_h,
        s_dt_d,
        s_bias_h,
        s_bias_d,
        s_A_h,
        s_A_d,
        s_A_n,
        s_B_b,
        s_B_g,
        s_B_n,
        s_C_b,
        s_C_g,
        s_C_n,
        s_D_h,
        s_D_d,
        s_z_b,
        s_z_h,
        s_z_d,
        s_out_b,
        s_out_h,
        s_out_d,
        s_idx,
        COMPUTE: tl.constexpr,
        DT_SOFTPLUS: tl.constexpr,
        HAS_DT_BIAS: tl.constexpr,
        HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr,
        HAS_INDICES: tl.constexpr,
        TIE_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # int64 offsets: a cache of many rows can pass 2**31 elements
        b = tl.program_id(1).to(tl.int64)
        h = tl.program_id(2).to(tl.int64)
        row = b
        if HAS_INDICES:
            row = tl.load(indices_ptr + b * s_idx).to(tl.int64)
        live = row >= 0  # a negative index is a padding request: no row read or written
        row = tl.maximum(row, 0)

        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        # the padding mask folded into the bound (the interpreter turns `tensor & scalar` into ints)
        mask = (offs_d < tl.where(live, dim, 0))[:, None] & mask_n[None, :]

        state_ptrs = (
            state_ptr + row * s_state_b + h * s_state_h + offs_d[:, None] * s_state_d + offs_n[None, :] * s_state_n
        )
        state = tl.load(state_ptrs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + b * s_x_b + h * s_x_h + offs_d * s_x_d, mask=mask_d, other=0.0).to(COMPUTE)
        B_ptrs = B_ptr + b * s_B_b + (h // heads_per_B_group) * s_B_g + offs_n * s_B_n
        C_ptrs = C_ptr + b * s_C_b + (h // heads_per_C_group) * s_C_g + offs_n * s_C_n
        B = tl.load(B_ptrs, mask=mask_n, other=0.0).to(COMPUTE)
        C = tl.load(C_ptrs, mask=mask_n, other=0.0).to(COMPUTE)

        if TIE_DIM:  # A, dt (and dt_bias) constant over the head's channels, as Mamba-2 passes them
            dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(COMPUTE)
            if HAS_DT_BIAS:
                dt += tl.load(dt_bias_ptr + h * s_bias_h).to(COMPUTE)
            if DT_SOFTPLUS:
                dt = _softplus(dt)
            dA = tl.exp(tl.load(A_ptr + h * s_A_h).to(COMPUTE) * dt)  # one exp per program
        else:
            dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + offs_d * s_dt_d, mask=mask_d, other=0.0).to(COMPUTE)
            if HAS_DT_BIAS:
                dt += tl.load(dt_bias_ptr + h * s_bias_h + offs_d * s_bias_d, mask=mask_d, other=0.0).to(COMPUTE)
            if DT_SOFTPLUS:
                dt = _softplus(dt)
            A_ptrs = A_ptr + h * s_A_h + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n
            dA = tl.exp(tl.load(A_ptrs, mask=mask, other=0.0).to(COMPUTE) * dt[:, None])

        state = state * dA + (dt * x)[:, None] * B[None, :]
        tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)

        # the output reads the state before it is rounded to the state's dtype, as the reference does
        out = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            out += x * tl.load(D_ptr + h * s_D_h + offs_d * s_D_d, mask=mask_d, other=0.0).to(COMPUTE)
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_d * s_z_d, mask=mask_d, other=0.0).to(COMPUTE)
            out *= z * tl.sigmoid(z)
        out = tl.where(live, out, 0.0)
        tl.store(out_ptr + b * s_out_b + h * s_out_h + offs_d * s_out_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else t.stride()


def _blocks(dim: int, dstate: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps): about 512 state elements a program, so that a small decode
    batch still spreads over the GPU's SMs (mamba_ssm's choice: 32 channels at N = 16)."""
    block_n = triton.next_power_of_2(dstate)
    block_d = min(max(512 // block_n, 4), 64, triton.next_power_of_2(dim))
    return block_d, block_n, 4 if block_d * block_n <= 1024 else 8


def _tied_over_dim(A: Tensor, dt: Tensor, dt_bias: Tensor | None) -> bool:
    return (
        A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and (dt_bias is None or dt_bias.stride(-1) == 0)
    )


def selective_state_update_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
) -> Tensor:
    """``esh.ops.selective_state_update`` in one kernel launch; shapes and indices are checked there."""
    reason = unsupported_reason(state.device)
    if reason is not None:
        raise RuntimeError(reason)
    if state.dim() == 3:  # one head: the kernel sees the multi-head form through size-1 views
        return selective_state_update_triton(
            state.unsqueeze(1),
            x.unsqueeze(1),
            dt.unsqueeze(1),
            A.unsqueeze(0),
            B.unsqueeze(1),
            C.unsqueeze(1),
            None if D is None else D.unsqueeze(0),
            None if z is None else z.unsqueeze(1),
            None if dt_bias is None else dt_bias.unsqueeze(0),
            dt_softplus,
            state_batch_indices,
        ).squeeze(1)

    batch, nheads, dim = x.shape
    dstate = state.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d, block_n, num_warps = _blocks(dim, dstate)
    grid = (triton.cdiv(dim, block_d), batch, nheads)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32  # as reference.compute_dtype
    _state_update_kernel[grid](
        state,
        x,
        dt,
        dt_bias,
        A,
        B,
        C,
        D,
        z,
        out,
        state_batch_indices,
        dim,
        dstate,
        nheads // B.shape[1],
        nheads // C.shape[1],
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *_strides(dt_bias, 2),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *_strides(D, 2),
        *_strides(z, 3),
        *out.stride(),
        *_strides(state_batch_indices, 1),
        COMPUTE=compute,
        DT_SOFTPLUS=dt_softplus,
        HAS_DT_BIAS=dt_bias is not None,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_INDICES=state_batch_indices is not None,
        TIE_DIM=_tied_over_dim(A, dt, dt_bias),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out
