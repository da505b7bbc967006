"""The ``"cpu"`` backend: the selective scan's forward pass as one fused C loop (``scan_cpu.c``).

The chunked PyTorch scan has to write each step's decays, inputs and states to memory and
read them back, op by op. This kernel keeps a block of 16 channels' state in registers for the
whole sequence instead, so inference pays for little more than the exponentials.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``; well under a
second), cached under ``$ESH_CACHE_DIR`` (default ``~/.cache/esh``) by a hash of the source,
the flags and this CPU, and loaded with ctypes: no Python headers, no torch headers, no CUDA,
and nothing at install time. Where no compiler works, or ``ESH_CPU_KERNEL=0`` is set, the
dispatcher simply keeps using the chunked scan (``available()`` says which).

Forward only, CPU, float32 arithmetic (bfloat16 and float16 inputs are converted, as the other
backends do): calls that need gradients, float64, constant B/C, groups of channels not a
multiple of 16 or more than 64 states go to the chunked scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from esh.errors import InputError

from .chunked import LOG2E, is_seq_major

ENV_VAR = "ESH_CPU_KERNEL"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 16  # channels per block of the C loop (W in scan_cpu.c)
MAX_STATES = 64  # ESH_MAX_N in scan_cpu.c
_SOURCE = Path(__file__).with_name("scan_cpu.c")
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
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"scan_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(_SOURCE), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
            lib.esh_scan_fwd_f32.restype = None
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            # u, delta, A2, B, C, D, bias, softplus, y, h_last, h_init, batch, L, dim, N, G, threads
            lib.esh_scan_fwd_f32.argtypes = [ptr] * 7 + [ctypes.c_int] + [ptr] * 3 + [i64] * 5 + [ctypes.c_int]
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


def available() -> bool:
    """Whether the kernel is enabled and builds (building it on the first call)."""
    return enabled() and _load() is not None


def build_error() -> str | None:
    """Why the last build failed, if it did."""
    return _build_error


def unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state=None) -> str | None:
    """None when the kernel can run these inputs, else what stands in the way."""
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        return "it runs on CPU tensors only"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "it has no backward (training uses the chunked scan)"
    if any(t.dtype not in _DTYPES for t in tensors):
        return "it takes float32, bfloat16 and float16 inputs only (and computes in float32)"
    if B.dim() < 3 or C.dim() < 3:
        return "it needs input-dependent B and C"
    groups = max(B.shape[1] if B.dim() == 4 else 1, C.shape[1] if C.dim() == 4 else 1)
    return shape_unsupported_reason(*A.shape, groups)


def shape_unsupported_reason(dim: int, dstate: int, groups: int = 1) -> str | None:
    """The part of ``unsupported_reason`` that depends on the sizes only."""
    if (dim // groups) % BLOCK:
        return f"it needs a multiple of {BLOCK} channels per group"
    if dstate > MAX_STATES:
        return f"it supports at most {MAX_STATES} states"
    return None


def _bc(t: Tensor, groups: int) -> Tensor:
    """(batch, N, L) or (batch, G', N, L) -> contiguous (batch, L, G, N) float32."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.shape[1] != groups:
        t = t.repeat_interleave(groups // t.shape[1], dim=1)
    return t.permute(0, 3, 1, 2).float().contiguous()


def _seq_major(x: Tensor) -> Tensor:
    """(batch, dim, L) -> contiguous float32 (batch, L, dim): free for float32 sequence-major views."""
    return x.transpose(1, 2).float().contiguous()


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``selective_scan_reference``; the output comes back sequence-major
    (a (batch, dim, L) view of (batch, L, dim) memory) when ``u`` is, contiguous otherwise.
    ``initial_state`` (batch, dim, N): the state before the first step (default zero), e.g. the
    last state of the previous piece of a sequence scanned piece by piece."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native CPU scan kernel is unavailable: {_build_error}")
    reason = unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if reason is not None:
        raise InputError(f"selective_scan backend 'cpu' cannot run these inputs: {reason}")
    batch, dim, seqlen = u.shape
    n = A.shape[1]
    groups = max(B.shape[1] if B.dim() == 4 else 1, C.shape[1] if C.dim() == 4 else 1)
    u_s, delta_s = _seq_major(u), _seq_major(delta)
    A2 = (A.float() * LOG2E).t().contiguous()
    Bs, Cs = _bc(B, groups), _bc(C, groups)
    Dc = None if D is None else D.float().contiguous()
    bias = None if delta_bias is None else delta_bias.float().contiguous()
    y = torch.empty_like(u_s)
    last = u_s.new_empty(batch, dim, n) if return_last_state else None
    if initial_state is not None:  # its shape was checked with the rest by the dispatcher
        initial_state = initial_state.float().contiguous()
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lib.esh_scan_fwd_f32(
        ptr(u_s), ptr(delta_s), ptr(A2), ptr(Bs), ptr(Cs), ptr(Dc), ptr(bias), int(delta_softplus),
        ptr(y), ptr(last), ptr(initial_state), batch, seqlen, dim, n, groups, torch.get_num_threads(),
    )  # fmt: skip
    out = y.transpose(1, 2)
    if not is_seq_major(u):
        out = out.contiguous()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(u.dtype)  # half-precision inputs: float32 arithmetic, output in their dtype
    return (out, last) if return_last_state else out
