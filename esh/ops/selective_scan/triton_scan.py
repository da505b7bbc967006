"""The selective scan as Triton kernels, forward and backward: a GPU backend that installs with pip.

Design (the recurrence is the one in ``reference.py``):

* **State in registers, sequence in a loop.** One program owns a (batch, block of ``BLOCK_D``
  channels) pair and keeps its (BLOCK_D, N) float32 state in registers (N padded to a power of
  two and masked) while it walks the sequence step by step. Decays are multiplied step by step,
  never formed as the exp of a cumulative sum, so nothing overflows, and a decay that underflows
  to 0 simply forgets the past, as in the reference. No (batch, dim, L, N) tensor is ever stored.
* **Checkpoints instead of states.** The forward writes the output and, every ``K`` steps
  (``checkpoint_every``, 64 by default), the state before that chunk: a (batch, L/K, dim, N)
  float32 tensor, 1/K of all the states. These, the inputs and nothing else are saved.
* **Backward by recomputation.** Each program walks its chunks in reverse. It recomputes the
  chunk's states from the checkpoint into a per-program scratch of (K + 1, BLOCK_D, N) floats
  (it stays in L2), then runs the adjoint ``g[t] = C[t] dy[t] + exp(delta[t+1] A) g[t+1]``
  backwards through the chunk and writes du, ddelta (through softplus and bias) and dz.
  dA, dD, d(delta_bias) and the gradients of constant B/C are summed per program in registers;
  input-dependent dB/dC get one partial row per (program, group) and time step, and the rows are
  summed afterwards in a fixed order: the gradients are deterministic (no atomics).
* **Sequence split.** When batch x channel blocks would leave the GPU mostly idle (e.g.
  (1, 1024, 4096, 16)), L is also cut into segments of whole chunks run by separate programs:
  pass 1 computes every segment's end state from zero and its total decay, a small carry
  kernel chains them across segments, pass 2 replays each segment from its true initial state.
  The backward splits the same way, in reverse: pass 1 propagates the adjoint through each
  segment from zero (this needs no states), the carry chains them from the last segment to the
  first, pass 2 is the per-chunk backward above started from each segment's true adjoint.

Arithmetic and state are float32 for float32, bfloat16 and float16 inputs; the output has
``u``'s dtype, the last state is float32, every gradient has its input's dtype. float64 inputs
are rejected with a ``ValueError``: the dispatcher sends them to another backend.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported): that is how the tests check them without a GPU.
"""

import math
import os
from types import SimpleNamespace

import torch
from torch import Tensor

from esh.errors import InputError

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; is_available() says False
    triton = None
    tl = SimpleNamespace(constexpr=None)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


DEFAULT_CHECKPOINT_EVERY = 64

# Split the sequence when there are fewer programs than this many per SM, aiming at
# _TARGET_PROGRAMS_PER_SM per SM, with at least _MIN_SEGMENT_CHUNKS chunks per segment (each
# segment's summary pass must stay cheap next to the work it parallelises).
_SPLIT_BELOW_PROGRAMS_PER_SM = 2
_TARGET_PROGRAMS_PER_SM = 4
_MIN_SEGMENT_CHUNKS = 2


def is_available() -> bool:
    """Triton imports and its kernels can run here: on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1`` (which must be set before triton is imported)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def unsupported_reason(device_type: str) -> str | None:
    """Why tensors on a device of this type cannot take this backend, or None."""
    if triton is None:
        return "the triton package is not installed (pip install triton; CUDA builds of torch ship it)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "it runs CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported; tests)"
        )
    return f"it runs only on CUDA tensors; the inputs are on {device_type}"


def unsupported_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> str | None:
    """Why these inputs cannot take this backend, or None (it computes in float32: no float64)."""
    wide = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None and t.dtype == torch.float64]
    return "it computes in float32 and takes no float64 inputs" if wide else None


# ----------------------------------------------------------------------------------------------
# Kernels. Shared conventions: u, delta, z, out and their gradients are addressed through their
# own (batch, dim, L) strides; B and C through (batch, group, N, L) strides, with a constant
# (dim, N) one passed as batch stride 0, one channel per group and time stride 0; segment
# summaries and carries are contiguous (batch, n_seg, dim, N).


@_jit
def _softplus(x):
    # log1p(exp(x)) with log1p done by hand (exact for tiny exp(x)); x > 20 -> x, as mamba_ssm
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x <= 20.0, lp, x)


@_jit
def _step_size(delta_ptrs, mask_d, bias, SOFTPLUS: tl.constexpr):
    x = tl.load(delta_ptrs, mask=mask_d, other=0.0).to(tl.float32) + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return x, dt


@_jit
def _row_sums(x, BLOCK_D: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_D, BLOCK_N) -> (BLOCK_D // SUB, BLOCK_N): sums over runs of SUB channels."""
    return tl.sum(tl.reshape(x, (BLOCK_D // SUB, SUB, BLOCK_N)), axis=1)


@_jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr,
    out_ptr, ckpt_ptr, last_ptr,
    dim, L, N, n_chunks, seg_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_ad, s_an,
    s_Bb, s_Bg, s_Bn, s_Bl, gs_B,
    s_Cb, s_Cg, s_Cn, s_Cl, gs_C,
    s_ib, s_is, s_id, s_in,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, SUMMARY: tl.constexpr, CHECKPOINT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    """One (batch, channel block, segment) program. SUMMARY: start from zero, write only the
    segment's end state and total decay (into ckpt_ptr / last_ptr as (batch, n_seg, dim, N)).
    CHECKPOINT: keep the state before every K-step chunk for the backward."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < N)[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    d_row = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    o_row = out_ptr + pid_b * s_ob + offs_d * s_od
    B_row = B_ptr + pid_b * s_Bb + (offs_d // gs_B)[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_row = C_ptr + pid_b * s_Cb + (offs_d // gs_C)[:, None] * s_Cg + offs_n[None, :] * s_Cn
    state_offs = offs_d[:, None] * N + offs_n[None, :]  # inside one contiguous (dim, N) slab

    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if HAS_INIT:
        init = init_ptr + pid_b * s_ib + pid_s * s_is + offs_d[:, None] * s_id + offs_n[None, :] * s_in
        h = tl.load(init, mask=mask, other=0.0).to(tl.float32)
    decay = tl.full((BLOCK_D, BLOCK_N), 1.0, tl.float32)

    c0 = pid_s * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    for c in range(c0, c1):
        if CHECKPOINT:
            tl.store(ckpt_ptr + (pid_b * n_chunks + c) * dim * N + state_offs, h, mask=mask)
        for t in range(c * K, tl.minimum(c * K + K, L)):
            _, dt = _step_size(d_row + t * s_dl, mask_d, bias, SOFTPLUS)
            u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_row + t * s_Bl, mask=mask, other=0.0).to(tl.float32)
            a = tl.exp(dt[:, None] * A)
            h = a * h + (dt * u_t)[:, None] * B_t
            if SUMMARY:
                decay = decay * a
            else:
                C_t = tl.load(C_row + t * s_Cl, mask=mask, other=0.0).to(tl.float32)
                y = tl.sum(h * C_t, axis=1) + Dv * u_t
                if HAS_Z:
                    z_t = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
                    y = y * z_t * tl.sigmoid(z_t)
                tl.store(o_row + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    if SUMMARY:
        seg_offs = (pid_b * tl.num_programs(2) + pid_s) * dim * N + state_offs
        tl.store(ckpt_ptr + seg_offs, h, mask=mask)
        tl.store(last_ptr + seg_offs, decay, mask=mask)
    else:
        if c1 == n_chunks:
            tl.store(last_ptr + pid_b * dim * N + state_offs, h, mask=mask)


@_jit
def _carry_kernel(
    end_ptr, decay_ptr, init_ptr, carry_ptr, n_seg, numel,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """carry[s] = what flows into segment s: x <- decay[s] * x + end[s] over the segments in
    order (forward states) or in reverse order (adjoints), starting from init (batch, dim, N)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.zeros((BLOCK,), tl.float32)
    if HAS_INIT:
        x = tl.load(init_ptr + pid_b * numel + offs, mask=mask, other=0.0).to(tl.float32)
    for i in range(0, n_seg):
        s = i
        if REVERSE:
            s = n_seg - 1 - i
        at = (pid_b * n_seg + s) * numel + offs
        tl.store(carry_ptr + at, x, mask=mask)
        x = tl.load(decay_ptr + at, mask=mask, other=0.0) * x + tl.load(end_ptr + at, mask=mask, other=0.0)


@_jit
def _adjoint_summary_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, end_ptr, decay_ptr,
    dim, L, N, seg_len,
    s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_ad, s_an,
    s_Cb, s_Cg, s_Cn, s_Cl, gs_C,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Pass 1 of the split backward: the adjoint carried from the end of the segment (taken as 0)
    to just before its first step, and the segment's total decay. Needs no states."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    d_row = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    g_row = dout_ptr + pid_b * s_gb + offs_d * s_gd
    C_row = C_ptr + pid_b * s_Cb + (offs_d // gs_C)[:, None] * s_Cg + offs_n[None, :] * s_Cn

    g = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    decay = tl.full((BLOCK_D, BLOCK_N), 1.0, tl.float32)
    t0 = pid_s * seg_len
    t1 = tl.minimum(t0 + seg_len, L)
    for i in range(0, t1 - t0):
        t = t1 - 1 - i
        dy = tl.load(g_row + t * s_gl, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            z_t = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
            dy = dy * z_t * tl.sigmoid(z_t)
        C_t = tl.load(C_row + t * s_Cl, mask=mask, other=0.0).to(tl.float32)
        _, dt = _step_size(d_row + t * s_dl, mask_d, bias, SOFTPLUS)
        a = tl.exp(dt[:, None] * A)
        g = a * (g + dy[:, None] * C_t)
        decay = decay * a
    seg_offs = (pid_b * tl.num_programs(2) + pid_s) * dim * N + offs_d[:, None] * N + offs_n[None, :]
    tl.store(end_ptr + seg_offs, g, mask=mask)
    tl.store(decay_ptr + seg_offs, decay, mask=mask)


@_jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr, ginit_ptr,
    scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, N, n_chunks, seg_chunks, rows_B, rows_C,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    s_ad, s_an,
    s_Bb, s_Bg, s_Bn, s_Bl, gs_B,
    s_Cb, s_Cg, s_Cn, s_Cl, gs_C,
    s_ib, s_is, s_id, s_in,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GINIT: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    SUB_B: tl.constexpr, SUB_C: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_seg = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    d_row = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    g_row = dout_ptr + pid_b * s_gb + offs_d * s_gd
    du_row = du_ptr + pid_b * s_dub + offs_d * s_dud
    dd_row = ddelta_ptr + pid_b * s_ddb + offs_d * s_ddd
    dz_row = dz_ptr + pid_b * s_dzb + offs_d * s_dzd
    B_row = B_ptr + pid_b * s_Bb + (offs_d // gs_B)[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_row = C_ptr + pid_b * s_Cb + (offs_d // gs_C)[:, None] * s_Cg + offs_n[None, :] * s_Cn
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    # input-dependent dB/dC partials: (batch, rows, L, N), one row per SUB channels (one group)
    rb = pid_d * (BLOCK_D // SUB_B) + tl.arange(0, BLOCK_D // SUB_B)
    dB_rows = dB_ptr + (pid_b * rows_B + rb[:, None]) * L * N + offs_n[None, :]
    dB_mask = (rb * SUB_B < dim)[:, None] & mask_n[None, :]
    rc = pid_d * (BLOCK_D // SUB_C) + tl.arange(0, BLOCK_D // SUB_C)
    dC_rows = dC_ptr + (pid_b * rows_C + rc[:, None]) * L * N + offs_n[None, :]
    dC_mask = (rc * SUB_C < dim)[:, None] & mask_n[None, :]
    scratch = scratch_ptr + ((pid_b * tl.num_programs(1) + pid_d) * n_seg + pid_s) * (K + 1) * BLOCK_D * BLOCK_N
    scratch_offs = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

    g = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # dL/dh[t], the part from steps after t
    if HAS_GINIT:
        gi = ginit_ptr + pid_b * s_ib + pid_s * s_is + offs_d[:, None] * s_id + offs_n[None, :] * s_in
        g = tl.load(gi, mask=mask, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)

    c0 = pid_s * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    for ci in range(0, c1 - c0):
        c = c1 - 1 - ci
        t0 = c * K
        t1 = tl.minimum(t0 + K, L)
        # recompute the chunk's states: scratch[k] = h[t0 + k - 1]
        h = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * dim * N + state_offs, mask=mask, other=0.0)
        tl.store(scratch + scratch_offs, h)
        for t in range(t0, t1):
            _, dt = _step_size(d_row + t * s_dl, mask_d, bias, SOFTPLUS)
            u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_row + t * s_Bl, mask=mask, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t
            tl.store(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N + scratch_offs, h)
        tl.debug_barrier()  # the scratch is read back by other threads than wrote it
        for i in range(0, t1 - t0):
            t = t1 - 1 - i
            h_prev = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N + scratch_offs)
            x, dt = _step_size(d_row + t * s_dl, mask_d, bias, SOFTPLUS)
            u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_row + t * s_Bl, mask=mask, other=0.0).to(tl.float32)
            C_t = tl.load(C_row + t * s_Cl, mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(g_row + t * s_gl, mask=mask_d, other=0.0).to(tl.float32)
            dy = dout
            if HAS_Z:
                z_t = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z_t)
                y = tl.sum(h * C_t, axis=1) + Dv * u_t
                dz = dout * y * sig * (1.0 + z_t * (1.0 - sig))
                tl.store(dz_row + t * s_dzl, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dout * z_t * sig
            a = tl.exp(dt[:, None] * A)
            g = g + dy[:, None] * C_t  # now the whole dL/dh[t]
            dC_t = dy[:, None] * h
            gB = g * B_t
            dB_t = g * (dt * u_t)[:, None]
            ga_h = g * a * h_prev
            du = dt * tl.sum(gB, axis=1) + Dv * dy
            ddt = tl.sum(ga_h * A, axis=1) + u_t * tl.sum(gB, axis=1)
            dA_acc += ga_h * dt[:, None]
            dD_acc += dy * u_t
            if SOFTPLUS:
                ddt = tl.where(x <= 20.0, ddt * tl.sigmoid(x), ddt)
            dbias_acc += ddt
            tl.store(du_row + t * s_dul, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dd_row + t * s_ddl, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            if B_VAR:
                tl.store(dB_rows + t * N, _row_sums(dB_t, BLOCK_D, SUB_B, BLOCK_N), mask=dB_mask)
            else:
                dB_acc += dB_t
            if C_VAR:
                tl.store(dC_rows + t * N, _row_sums(dC_t, BLOCK_D, SUB_C, BLOCK_N), mask=dC_mask)
            else:
                dC_acc += dC_t
            g = a * g  # the part of dL/dh[t-1] from steps t and later
            h = h_prev
        tl.debug_barrier()  # before the next chunk overwrites the scratch

    part = (pid_b * n_seg + pid_s) * dim
    tl.store(dA_ptr + part * N + state_offs, dA_acc, mask=mask)
    tl.store(dD_ptr + part + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + part + offs_d, dbias_acc, mask=mask_d)
    if not B_VAR:
        tl.store(dB_ptr + part * N + state_offs, dB_acc, mask=mask)
    if not C_VAR:
        tl.store(dC_ptr + part * N + state_offs, dC_acc, mask=mask)
    if pid_s == 0:
        tl.store(dh0_ptr + pid_b * dim * N + state_offs, g, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch plans


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _lowbit(n: int) -> int:
    return n & -n


class _BC:
    """B or C as the kernels address it: (batch, group, N, L) strides and channels per group."""

    def __init__(self, t: Tensor, dim: int):
        self.t = t
        self.is_variable = t.dim() > 2
        if t.dim() == 2:  # constant (dim, N): batch stride 0, one channel per group, time stride 0
            self.groups, self.group_size = dim, 1
            self.strides = (0, t.stride(0), t.stride(1), 0)
        else:
            v = t.unsqueeze(1) if t.dim() == 3 else t
            self.groups, self.group_size = v.shape[1], dim // v.shape[1]
            self.strides = tuple(v.stride())

    def sub(self, block_d: int) -> int:
        """Channels summed into one dB/dC partial row: all of a block, unless the groups are
        smaller than a block or not aligned to it."""
        if not self.is_variable or self.groups == 1:
            return block_d
        return min(block_d, _lowbit(self.group_size))

    def rows(self, block_d: int, dim: int) -> int:
        return math.ceil(dim / self.sub(block_d))

    def reduce_partials(self, part: Tensor, dtype: torch.dtype) -> Tensor:
        """(batch, rows, L, N) partials, or (batch, n_seg, dim, N) for a constant one, summed
        in a fixed order into the input's shape."""
        if not self.is_variable:
            return part.sum((0, 1)).to(dtype)
        batch, rows, seqlen, n = part.shape
        g = self.groups
        grad = part.view(batch, g, rows // g, seqlen, n).sum(2).transpose(-1, -2)
        grad = grad.squeeze(1) if self.t.dim() == 3 else grad
        return grad.to(dtype)


def _default_block_d(block_n: int) -> int:
    return 32 if block_n <= 16 else max(4, 512 // block_n)


def _num_warps(block_d: int, block_n: int) -> int:
    return max(1, min(4, block_d * block_n // 128))


def _segments(batch: int, n_dblocks: int, n_chunks: int, device: torch.device, forced: int | None) -> int:
    """How many sequence segments each (batch, channel block) is cut into."""
    if forced is not None:
        return max(1, min(int(forced), n_chunks))
    if device.type != "cuda":
        return 1
    programs = batch * n_dblocks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= _SPLIT_BELOW_PROGRAMS_PER_SM * sms:
        return 1
    want = math.ceil(_TARGET_PROGRAMS_PER_SM * sms / programs)
    return max(1, min(want, n_chunks // _MIN_SEGMENT_CHUNKS))


def _seg_chunks(n_chunks: int, n_seg: int) -> tuple[int, int]:
    """(chunks per segment, segments) with every segment non-empty."""
    per = math.ceil(n_chunks / n_seg)
    return per, math.ceil(n_chunks / per)


def _bl_strides(x: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if x is None else tuple(x.stride())


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, K, block_d, split, checkpoint):
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    block_n = _next_pow2(N)
    n_dblocks = math.ceil(dim / block_d)
    n_chunks = math.ceil(seqlen / K)
    seg_chunks, n_seg = _seg_chunks(n_chunks, _segments(batch, n_dblocks, n_chunks, u.device, split))
    Bi, Ci = _BC(B, dim), _BC(C, dim)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty_like(u)
    ckpt = torch.empty(batch, n_chunks if checkpoint else 0, dim, N, **f32)
    last = torch.empty(batch, dim, N, **f32)
    dummy = u  # stands in for absent optional tensors; never read
    common = (
        (dim, seqlen, N, n_chunks, seg_chunks)
        + tuple(u.stride())
        + tuple(delta.stride())
        + _bl_strides(z)
        + tuple(out.stride())
        + tuple(A.stride())
        + Bi.strides
        + (Bi.group_size,)
        + Ci.strides
        + (Ci.group_size,)
    )
    flags = dict(
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        K=K,
        num_warps=_num_warps(block_d, block_n),
    )
    grid = (batch, n_dblocks, n_seg)
    opt = [dummy if t is None else t for t in (D, z, delta_bias)]
    if n_seg == 1:
        init = initial_state
        init_strides = (0, 0, 0, 0) if init is None else (init.stride(0), 0, init.stride(1), init.stride(2))
    else:
        ends = torch.empty(batch, n_seg, dim, N, **f32)
        decays = torch.empty_like(ends)
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, opt[0], opt[1], opt[2], dummy, dummy, ends, decays,
            *common, 0, 0, 0, 0,
            HAS_INIT=False, SUMMARY=True, CHECKPOINT=False, **flags,
        )  # fmt: skip
        init = _carry(ends, decays, initial_state, reverse=False)
        init_strides = tuple(init.stride())
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, opt[0], opt[1], opt[2], dummy if init is None else init, out, ckpt, last,
        *common, *init_strides,
        HAS_INIT=init is not None, SUMMARY=False, CHECKPOINT=checkpoint, **flags,
    )  # fmt: skip
    return out, last, ckpt


def _carry(ends: Tensor, decays: Tensor, init: Tensor | None, reverse: bool) -> Tensor:
    batch, n_seg, dim, N = ends.shape
    carry = torch.empty_like(ends)
    init = None if init is None else init.float().contiguous()
    block = 256
    _carry_kernel[(batch, math.ceil(dim * N / block))](
        ends, decays, ends if init is None else init, carry, n_seg, dim * N,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=block,
    )  # fmt: skip
    return carry


def _backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    K, block_d, softplus = ctx.K, ctx.block_d, ctx.softplus
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    block_n = _next_pow2(N)
    n_dblocks = math.ceil(dim / block_d)
    n_chunks = ckpt.shape[1]
    seg_chunks, n_seg = _seg_chunks(n_chunks, _segments(batch, n_dblocks, n_chunks, u.device, ctx.split))
    Bi, Ci = _BC(B, dim), _BC(C, dim)
    f32 = dict(device=u.device, dtype=torch.float32)
    if dout is None:
        dout = torch.zeros_like(u)
    dummy = u
    opt = [dummy if t is None else t for t in (D, z, delta_bias)]

    if n_seg == 1:
        ginit = dlast
        ginit_strides = (0, 0, 0, 0) if dlast is None else (dlast.stride(0), 0, dlast.stride(1), dlast.stride(2))
    else:
        ends = torch.empty(batch, n_seg, dim, N, **f32)
        decays = torch.empty_like(ends)
        _adjoint_summary_kernel[(batch, n_dblocks, n_seg)](
            delta, A, C, opt[1], opt[2], dout, ends, decays,
            dim, seqlen, N, seg_chunks * K,
            *delta.stride(), *_bl_strides(z), *dout.stride(),
            *A.stride(), *Ci.strides, Ci.group_size,
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=_num_warps(block_d, block_n),
        )  # fmt: skip
        ginit = _carry(ends, decays, dlast, reverse=True)
        ginit_strides = tuple(ginit.stride())

    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    sub_B, sub_C = Bi.sub(block_d), Ci.sub(block_d)
    rows_B, rows_C = Bi.rows(block_d, dim), Ci.rows(block_d, dim)
    var_part = lambda rows: torch.empty(batch, rows, seqlen, N, **f32)  # noqa: E731
    dB_part = var_part(rows_B) if Bi.is_variable else torch.empty(batch, n_seg, dim, N, **f32)
    dC_part = var_part(rows_C) if Ci.is_variable else torch.empty(batch, n_seg, dim, N, **f32)
    dA_part = torch.empty(batch, n_seg, dim, N, **f32)
    dD_part = torch.empty(batch, n_seg, dim, **f32)
    dbias_part = torch.empty(batch, n_seg, dim, **f32)
    dh0 = torch.empty(batch, dim, N, **f32)
    scratch = torch.empty(batch * n_dblocks * n_seg * (K + 1) * block_d * block_n, **f32)
    _scan_bwd_kernel[(batch, n_dblocks, n_seg)](
        u, delta, A, B, C, opt[0], opt[1], opt[2], dout, ckpt, dummy if ginit is None else ginit, scratch,
        du, ddelta, dummy if dz is None else dz, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
        dim, seqlen, N, n_chunks, seg_chunks, rows_B, rows_C,
        *u.stride(), *delta.stride(), *_bl_strides(z), *dout.stride(),
        *du.stride(), *ddelta.stride(), *_bl_strides(dz),
        *A.stride(), *Bi.strides, Bi.group_size, *Ci.strides, Ci.group_size,
        *ginit_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_GINIT=ginit is not None, B_VAR=Bi.is_variable, C_VAR=Ci.is_variable, SUB_B=sub_B, SUB_C=sub_C,
        BLOCK_D=block_d, BLOCK_N=block_n, K=K, num_warps=_num_warps(block_d, block_n),
    )  # fmt: skip
    grads = dict(
        u=du,
        delta=ddelta,
        A=dA_part.sum((0, 1)).to(A.dtype),
        B=Bi.reduce_partials(dB_part, B.dtype),
        C=Ci.reduce_partials(dC_part, C.dtype),
        D=None if D is None else dD_part.sum((0, 1)).to(D.dtype),
        z=dz,
        delta_bias=None if delta_bias is None else dbias_part.sum((0, 1)).to(delta_bias.dtype),
        initial_state=None if ctx.initial_state_dtype is None else dh0.to(ctx.initial_state_dtype),
    )
    return grads


_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, K, block_d, split, checkpoint):
        out, last, ckpt = _forward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, K, block_d, split, checkpoint
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus, ctx.K, ctx.block_d, ctx.split = softplus, K, block_d, split
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        grads = _backward(ctx, dout, dlast)
        return tuple(grads[k] if need else None for k, need in zip(_INPUTS, ctx.needs_input_grad)) + (None,) * 5


def selective_scan_triton(
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
    initial_state: Tensor | None = None,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    block_d: int | None = None,
    split_segments: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan in Triton with the semantics of ``selective_scan_reference``.

    Args:
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state: as
            ``selective_scan``. u, delta and z may have any strides (channel-major, or
            (batch, dim, L) views of (batch, L, dim) memory); they are not copied.
        initial_state: (batch, dim, N) state before step 0 (default zero); differentiable.
        checkpoint_every: K, the steps between the states the forward keeps for the backward.
        block_d: channels per program (a power of two); default 32 for N <= 16, fewer above.
        split_segments: cut the sequence into this many segments of whole K-step chunks, run
            in parallel with a carry pass between them (forward and backward). Default: chosen
            on CUDA from the number of (batch, channel block) programs against the number of
            SMs; never on the CPU.

    Returns:
        ``out`` in ``u``'s dtype, and the float32 last state (batch, dim, N) when
        ``return_last_state``.

    Raises:
        ValueError: for float64 inputs (this backend computes in float32; the dispatcher
            sends float64 to another backend), or a malformed ``initial_state``/keyword.
    """
    if triton is None:
        raise RuntimeError("selective_scan_triton: triton is not installed")
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    wide = [name for name, t in tensors.items() if t is not None and t.dtype == torch.float64]
    if wide:
        raise InputError(
            f"selective_scan_triton: float64 inputs are not supported ({', '.join(wide)}); this backend "
            "computes in float32 (use the 'reference' or 'chunked' backend for float64)"
        )
    batch, dim, _ = u.shape
    N = A.shape[1]
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise InputError(
            f"selective_scan_triton: initial_state must have shape (batch, dim, N) = {(batch, dim, N)}; "
            f"got {tuple(initial_state.shape)}"
        )
    if checkpoint_every < 1:
        raise InputError(f"selective_scan_triton: checkpoint_every must be >= 1; got {checkpoint_every}")
    if block_d is None:
        block_d = _default_block_d(_next_pow2(N))
    if block_d < 1 or block_d & (block_d - 1):
        raise InputError(f"selective_scan_triton: block_d must be a power of two; got {block_d}")
    # without gradients the forward keeps no checkpoints
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())
    out, last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), checkpoint_every, block_d,
        split_segments, needs_grad,
    )  # fmt: skip
    return (out, last) if return_last_state else out
