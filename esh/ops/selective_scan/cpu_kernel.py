"""The ``"cpu"`` backend: the selective scan, forward and backward, as fused C loops (``scan_cpu.c``).

The chunked PyTorch scan has to write each step's decays, inputs and states to memory and
read them back, op by op. This kernel keeps a block of 16 channels' state in registers for the
whole sequence instead, so inference pays for little more than the exponentials.

Training goes through ``SelectiveScanCpu``, an autograd Function: its forward also keeps the
state entering every K-th step (``checkpoint_steps``; O(batch * dim * N * L / K) floats), and
its backward walks each block of channels back through the sequence K steps at a time,
recomputes those K states from their checkpoint and runs the adjoint recurrence, writing every
gradient in the same pass. Sums across channels and across the batch are reduced from
per-block partials in a fixed order, so gradients are the same bits on every run and for any
number of threads.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``; well under a
second), cached under ``$ESH_CACHE_DIR`` (default ``~/.cache/esh``) by a hash of the source,
the flags and this CPU, and loaded with ctypes: no Python headers, no torch headers, no CUDA,
and nothing at install time. Where no compiler works, or ``ESH_CPU_KERNEL=0`` is set, the
dispatcher simply keeps using the chunked scan (``available()`` says which).

CPU tensors, float32 arithmetic (bfloat16 and float16 inputs are converted, as the other
backends do, and their gradients come back in their dtypes): float64, constant B/C, groups of
channels not a multiple of 16 or more than 64 states go to the chunked scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from esh._io import atomic_path
from esh.errors import InputError

from .chunked import LOG2E, is_seq_major

ENV_VAR = "ESH_CPU_KERNEL"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 16  # channels per block of the C loop (W in scan_cpu.c)
MAX_STATES = 64  # ESH_MAX_N in scan_cpu.c
_SOURCES = tuple(Path(__file__).with_name(f"{name}_cpu.c") for name in ("scan", "conv", "norm", "lowrank"))
_HEADERS = (Path(__file__).with_name("esh_math.h"),)  # included by the sources: part of the cache key
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    ["-O3", "-march=native", "-ffast-math"],  # compilers without OpenMP (Apple clang): one thread
    ["-O3", "-ffast-math"],
)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_build_error: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("ESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "esh"
    )
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built on one CPU must not be loaded on another."""
    text = platform.machine() + platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        text += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    return text


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str, flags: list[str]) -> Path:
    source = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"scan_cpu-{key}.so"
    if target.exists():
        return target
    with atomic_path(target, mode=0o777) as tmp:  # another process never loads a half-written library
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(tmp), *map(str, _SOURCES), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _build_error
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None:
            _build_error = "no C compiler found (set $CC or install cc)"
            return None
        errors = []
        for flags in _FLAG_SETS:
            try:
                lib = ctypes.CDLL(str(_build(cc, flags)))
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                continue
            ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.esh_scan_fwd_f32.restype = None
            # u, delta, A2, B, C, D, bias, z, softplus, y, h_last, h_init, ckpt, K, batch, L, dim, N,
            # GB, GC, seq_major, threads
            lib.esh_scan_fwd_f32.argtypes = [ptr] * 8 + [cint] + [ptr] * 4 + [i64] * 7 + [cint] * 2
            lib.esh_scan_bwd_f32.restype = i64
            # u, delta, A2, B, C, D, bias, z, softplus, dout, dlast, ckpt, K, du, ddelta, dz, dA, dD,
            # dbias, dB, dC, dh0, batch, L, dim, N, GB, GC, seq_major, threads
            lib.esh_scan_bwd_f32.argtypes = [ptr] * 8 + [cint] + [ptr] * 3 + [i64] + [ptr] * 9 + [i64] * 6 + [cint] * 2
            lib.esh_scan_reduce_f32.restype = None
            lib.esh_scan_reduce_f32.argtypes = [ptr, ptr, i64, i64, i64, cint]
            # conv_cpu.c: x, x strides (batch, step), w, bias, out, out strides, batch, L, dim, K, left, silu, threads
            lib.esh_dwconv_fwd_f32.restype = None
            lib.esh_dwconv_fwd_f32.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64] + [i64] * 5 + [cint] * 2
            lib.esh_dwconv_items.restype = i64
            lib.esh_dwconv_items.argtypes = [i64, i64]
            # x, x strides, w, bias, g, gpre, dx, dw_part, db_part, batch, L, dim, K, left, silu, threads
            lib.esh_dwconv_bwd_f32.restype = None
            lib.esh_dwconv_bwd_f32.argtypes = [ptr, i64, i64] + [ptr] * 7 + [i64] * 5 + [cint] * 2
            # norm_cpu.c: fwd (x, w, y, rstd, rows, dim, eps, threads), items (rows),
            # bwd (x, w, rstd, g, dx, dw_part, rows, dim, threads)
            lib.esh_rmsnorm_fwd_f32.restype = None
            lib.esh_rmsnorm_fwd_f32.argtypes = [ptr] * 4 + [i64] * 2 + [ctypes.c_float, cint]
            lib.esh_rmsnorm_items.restype = i64
            lib.esh_rmsnorm_items.argtypes = [i64]
            lib.esh_rmsnorm_bwd_f32.restype = None
            lib.esh_rmsnorm_bwd_f32.argtypes = [ptr] * 6 + [i64] * 2 + [cint]
            # lowrank_cpu.c: items (M), bwd (x, x row stride, wt, g, g row stride, dx, dw_part, M, N, R, threads)
            lib.esh_lowrank_items.restype = i64
            lib.esh_lowrank_items.argtypes = [i64]
            lib.esh_lowrank_bwd_f32.restype = None
            lib.esh_lowrank_bwd_f32.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr] + [i64] * 3 + [cint]
            _lib = lib
            return lib
        _build_error = "; ".join(errors)
        warnings.warn(
            f"esh: the native CPU scan kernel could not be built, so the pure-PyTorch scan is used "
            f"(slower for inference, otherwise the same): {_build_error}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None where it is disabled
    (``ESH_CPU_KERNEL=0``) or does not build. Besides the scan it holds the depthwise
    convolution of ``esh.layers.conv`` (``conv_cpu.c``), the RMSNorm of ``esh.layers.norm``
    (``norm_cpu.c``) and the low-rank projection of ``esh.layers.linear`` (``lowrank_cpu.c``)."""
    return _load() if enabled() else None


def library_for(*tensors: Tensor | None) -> ctypes.CDLL | None:
    """``library()`` when the given tensors (None skipped) are all float32 CPU tensors, and
    neither torch.compile, FX nor the JIT is tracing (they need tensor operations, not a call
    they cannot see into; exports included); else None."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return None
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in tensors):
        return None
    return library()


def available() -> bool:
    """Whether the kernel is enabled and builds (building it on the first call)."""
    return library() is not None


def build_error() -> str | None:
    """Why the last build failed, if it did."""
    return _build_error


def unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state=None) -> str | None:
    """None when the kernel can run these inputs (forward, and backward where they need
    gradients), else what stands in the way."""
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        return "it runs on CPU tensors only"
    if any(t.dtype not in _DTYPES for t in tensors):
        return "it takes float32, bfloat16 and float16 inputs only (and computes in float32)"
    if B.dim() < 3 or C.dim() < 3:
        return "it needs input-dependent B and C"
    return shape_unsupported_reason(*A.shape, _groups(B, C))


def _groups(B: Tensor, C: Tensor) -> int:
    """The finest grouping of channels by B and C: each group of it sees one B and one C."""
    return math.lcm(B.shape[1] if B.dim() == 4 else 1, C.shape[1] if C.dim() == 4 else 1)


def shape_unsupported_reason(dim: int, dstate: int, groups: int = 1) -> str | None:
    """The part of ``unsupported_reason`` that depends on the sizes only (``groups``: the least
    common multiple of B's and C's groups)."""
    if (dim // groups) % BLOCK:
        return f"it needs a multiple of {BLOCK} channels per group"
    if dstate > MAX_STATES:
        return f"it supports at most {MAX_STATES} states"
    return None


def checkpoint_steps(dstate: int) -> int:
    """K, the steps between the states the forward keeps for the backward: the backward holds K
    states and decays of a block of 16 channels (2 K N 16 floats, 32 KiB up to 16 states, 64 KiB
    at most), near L1's size (measured 5-10% faster than K = 64 at N = 16)."""
    return max(8, min(64, 256 // max(1, dstate)))


def _bc(t: Tensor) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> contiguous (batch, L, G, N) float32."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).float().contiguous()


def _in_layout(x: Tensor, seq_major: bool) -> Tensor:
    """(batch, dim, L) float32, stored as a contiguous (batch, L, dim) tensor when ``seq_major``,
    contiguous otherwise: a free view when ``x`` already is."""
    if seq_major:
        return x.transpose(1, 2).float().contiguous().transpose(1, 2)
    return x.float().contiguous()


def _new(batch: int, dim: int, seqlen: int, seq_major: bool) -> Tensor:
    if seq_major:
        return torch.empty(batch, seqlen, dim).transpose(1, 2)
    return torch.empty(batch, dim, seqlen)


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float().contiguous()


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data address for the C functions (NULL for None)."""
    return None if t is None else t.data_ptr()


def reduce_partials(lib: ctypes.CDLL, part: Tensor, outer: int, count: int) -> Tensor:
    """part viewed as (outer, count, rest) summed over count in order (a view when count is 1)."""
    if count == 1:
        return part
    inner = part.numel() // (outer * count)
    out = part.new_empty(outer, inner)
    lib.esh_scan_reduce_f32(part.data_ptr(), out.data_ptr(), outer, count, inner, torch.get_num_threads())
    return out


class _Inputs:
    """The kernel's float32 contiguous forms of the inputs (free views where they already are).
    u, delta and z (and the output and their gradients) take u's layout: sequence-major or
    channel-major, the kernel reads either."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, initial_state):
        self.batch, self.dim, self.seqlen = u.shape
        self.n = A.shape[1]
        self.gb = B.shape[1] if B.dim() == 4 else 1
        self.gc = C.shape[1] if C.dim() == 4 else 1
        self.seq_major = is_seq_major(u)
        self.u, self.delta = _in_layout(u, self.seq_major), _in_layout(delta, self.seq_major)
        self.A2 = (A.float() * LOG2E).t().contiguous()
        self.B, self.C = _bc(B), _bc(C)
        self.D, self.bias = _opt(D), _opt(delta_bias)
        self.z = None if z is None else _in_layout(z, self.seq_major)
        self.h0 = _opt(initial_state)

    def tensors(self) -> list[Tensor | None]:
        return [self.u, self.delta, self.A2, self.B, self.C, self.D, self.bias, self.z, self.h0]

    def forward(self, lib, softplus: bool, want_last: bool, K: int | None):
        """(out (batch, dim, L) float32 in u's layout, the last state if wanted, and with K (for a
        backward) the checkpoints: the state entering every K-th step)."""
        batch, dim, n = self.batch, self.dim, self.n
        y = _new(batch, dim, self.seqlen, self.seq_major)
        last = self.u.new_empty(batch, dim, n) if want_last else None
        ckpt = self.u.new_empty(batch, -(-self.seqlen // K), dim // BLOCK, n, BLOCK) if K else None
        lib.esh_scan_fwd_f32(
            *(ptr(t) for t in self.tensors()[:8]), int(softplus), ptr(y), ptr(last),
            ptr(self.h0), ptr(ckpt), K or 0, batch, self.seqlen, dim, n, self.gb, self.gc,
            int(self.seq_major), torch.get_num_threads(),
        )  # fmt: skip
        return y, last, ckpt


class SelectiveScanCpu(torch.autograd.Function):
    """The C kernel's forward (keeping checkpoints) and backward, for inputs that need gradients."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint):
        lib = _load()
        x = _Inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
        K = checkpoint or checkpoint_steps(x.n)
        y, last, ckpt = x.forward(lib, delta_softplus, True, K)
        ctx.save_for_backward(*x.tensors(), ckpt)
        ctx.meta = (x.batch, x.dim, x.seqlen, x.n, x.gb, x.gc, K, delta_softplus, x.seq_major)
        ctx.like = [(t.dtype, t.dim()) for t in (u, B, C)]
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        ctx.set_materialize_grads(False)  # an unused last state's gradient stays None
        return y.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        lib = _load()
        u, delta, A2, Bs, Cs, D, bias, z, h0, ckpt = ctx.saved_tensors
        batch, dim, seqlen, n, gb, gc, K, softplus, seq_major = ctx.meta
        need = ctx.needs_input_grad
        blocks = dim // BLOCK
        dout = torch.zeros_like(u) if dout is None else _in_layout(dout, seq_major)
        dlast = None if dlast is None else dlast.float().contiguous()
        du, ddelta = _new(batch, dim, seqlen, seq_major), _new(batch, dim, seqlen, seq_major)
        dz = None if z is None else _new(batch, dim, seqlen, seq_major)
        dA_part = u.new_empty(batch, n, dim)
        dD_part = None if D is None else u.new_empty(batch, dim)
        dbias_part = None if bias is None else u.new_empty(batch, dim)
        dB_part = u.new_empty(batch, blocks, seqlen, n)
        dC_part = u.new_empty(batch, blocks, seqlen, n)
        dh0 = u.new_empty(batch, dim, n) if need[8] else None
        failed = lib.esh_scan_bwd_f32(
            *(ptr(t) for t in (u, delta, A2, Bs, Cs, D, bias, z)), int(softplus), ptr(dout), ptr(dlast),
            ptr(ckpt), K, ptr(du), ptr(ddelta), ptr(dz), ptr(dA_part), ptr(dD_part), ptr(dbias_part),
            ptr(dB_part), ptr(dC_part), ptr(dh0), batch, seqlen, dim, n, gb, gc, int(seq_major),
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError(f"the CPU scan's backward could not allocate its scratch for {failed} blocks")
        dt_u, dt_delta, dt_A, dt_B, dt_C, dt_D, dt_z, dt_bias, dt_h0 = ctx.dtypes

        def bc(part, groups, like):
            # (batch, blocks, L, N) -> (batch, G, L, N) -> (batch, G, N, L), or (batch, N, L)
            g = (
                reduce_partials(lib, part, batch * groups, blocks // groups)
                .view(batch, groups, seqlen, n)
                .transpose(2, 3)
            )
            return (g.squeeze(1) if like[1] == 3 else g).to(like[0])

        grads = [
            du.to(dt_u) if need[0] else None,
            ddelta.to(dt_delta) if need[1] else None,
            reduce_partials(lib, dA_part, 1, batch).view(n, dim).t().to(dt_A) if need[2] else None,
            bc(dB_part, gb, ctx.like[1]) if need[3] else None,
            bc(dC_part, gc, ctx.like[2]) if need[4] else None,
            reduce_partials(lib, dD_part, 1, batch).view(dim).to(dt_D) if D is not None and need[5] else None,
            dz.to(dt_z) if z is not None and need[6] else None,
            reduce_partials(lib, dbias_part, 1, batch).view(dim).to(dt_bias) if bias is not None and need[7] else None,
            dh0.to(dt_h0) if dh0 is not None else None,
        ]
        return (*grads, None, None)


def selective_scan_cpu(
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
    checkpoint_steps: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``selective_scan_reference``; the output (and the gradients of u, delta
    and z) come back sequence-major (a (batch, dim, L) view of (batch, L, dim) memory) when ``u``
    is, contiguous otherwise. ``initial_state`` (batch, dim, N): the state before the first step
    (default zero), e.g. the last state of the previous piece of a sequence scanned piece by
    piece. ``checkpoint_steps``: K for a backward (default ``checkpoint_steps(N)``)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native CPU scan kernel is unavailable: {_build_error}")
    reason = unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if reason is not None:
        raise InputError(f"selective_scan backend 'cpu' cannot run these inputs: {reason}")
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        out, last = SelectiveScanCpu.apply(*inputs, delta_softplus, checkpoint_steps)
        return (out, last) if return_last_state else out
    x = _Inputs(*inputs)  # its shapes were checked with the rest by the dispatcher
    y, last, _ = x.forward(lib, delta_softplus, return_last_state, None)
    out = y.to(u.dtype)  # half-precision inputs: float32 arithmetic, output in their dtype
    return (out, last) if return_last_state else out
