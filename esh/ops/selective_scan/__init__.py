"""The selective scan of Mamba, behind one signature with several backends.

``selective_scan`` has the arguments, shapes and semantics of mamba_ssm's
``selective_scan_fn``, so either can stand in for the other. Backends:

* ``"reference"``: the sequential loop in ``reference.py``; the specification.
* ``"chunked"``: the fast pure-PyTorch path with its own backward (``chunked.py``); any
  device, no compilation. The default on the CPU for what the C kernel cannot run, and on CUDA
  where no GPU kernel is there (with a one-time warning).
* ``"cpu"``: forward and backward as fused C loops (``scan_cpu.c``), compiled on first use with
  the system C compiler and cached (``cpu_kernel.py``); CPU tensors. The default for CPU
  inputs it can run, for inference and training, when a compiler is there (``ESH_CPU_KERNEL=0``
  turns it off); everything else falls back to ``"chunked"``.
* ``"triton"``: forward and backward in Triton (``triton_scan.py``); CUDA tensors (CPU ones
  under Triton's interpreter, for tests). The default on CUDA unless mamba_ssm's kernel takes
  the call.
* ``"cuda"``: mamba_ssm's fused CUDA kernel, the default on CUDA when its compiled extension
  imports and the call fits it (one dtype for u, delta and z; equal B/C groups; no
  ``initial_state``): other calls go to ``"triton"``; asking for ``"cuda"`` with them is a
  ``ValueError``.

Every backend but ``"cuda"`` takes an ``initial_state``, the state before the first step (the
last state of the previous piece of a sequence scanned piece by piece) and returns its
gradient. Under ``torch.compile`` a call is one ``esh::selective_scan`` node
(``compiled.py``) whose backend is picked when the graph runs.

Pick one with ``backend=`` or the ``ESH_SCAN_BACKEND`` environment variable; otherwise the
dispatcher takes the fastest backend that can run the inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import torch
from torch import Tensor

from esh.errors import EshError, InputError

from . import cpu_kernel, mamba_cuda, triton_scan
from ._checks import check_scan_inputs
from .chunked import selective_scan_chunked
from .reference import selective_scan_reference, selective_state_update_reference
from .state_update import selective_state_update

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "cpu_kernel_is_default",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
    "selective_state_update",
    "selective_state_update_reference",
    "use_backend",
]

BACKENDS = ("reference", "chunked", "cpu", "triton", "cuda")
ENV_VAR = "ESH_SCAN_BACKEND"


class BackendUnavailableError(EshError, RuntimeError):
    """A selective-scan backend was asked for that cannot run here."""


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run inputs on a device of this type ("triton" on the CPU only under
    Triton's interpreter, ``TRITON_INTERPRET=1``: for tests, not speed)."""
    names = ["reference", "chunked"]
    if device_type == "cpu" and cpu_kernel.available():
        names.append("cpu")
    if triton_scan.unsupported_reason(device_type) is None:
        names.append("triton")
    if device_type == "cuda" and mamba_cuda.is_available():
        names.append("cuda")
    return names


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("esh_scan_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str):
    """Run every ``selective_scan`` call without an explicit ``backend=`` on ``name`` inside
    the block (export uses the reference loop: plain ops that ONNX and TorchScript know)."""
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend a call will use: the argument, else ``use_backend``'s, else
    ``$ESH_SCAN_BACKEND``, else the fastest available for any inputs on this device ("cuda"
    or "chunked"; ``selective_scan`` then takes "cpu" for CPU inputs it can run)."""
    return _resolve(backend, device_type)[0]


def _requested_backend(backend: str | None) -> tuple[str | None, str]:
    """(the backend asked for, where from): the argument, else ``use_backend``'s, else
    ``$ESH_SCAN_BACKEND``; (None, ...) when nothing was asked for. Shared with the state update."""
    if backend is not None:
        return backend, "backend="
    if (forced := _forced.get()) is not None:
        return forced, "use_backend"
    return os.environ.get(ENV_VAR) or None, ENV_VAR


def _resolve(backend: str | None, device_type: str) -> tuple[str, bool]:
    """(backend, whether it was asked for rather than chosen)."""
    backend, source = _requested_backend(backend)
    if backend is None:
        return _default_backend(device_type), False
    backend = backend.strip().lower()
    if backend not in BACKENDS:
        raise InputError(f"selective_scan: unknown backend {backend!r} (from {source}); expected one of {BACKENDS}")
    if backend == "cuda":
        if not mamba_cuda.is_available():
            raise BackendUnavailableError(
                "selective_scan: backend 'cuda' needs mamba_ssm with its compiled selective_scan_cuda extension "
                "(mamba-ssm 2.3 builds it only with MAMBA_KEEP_CUDA_BUILD=TRUE); 'triton' and 'chunked' need nothing"
            )
        if device_type != "cuda":
            raise BackendUnavailableError(
                f"selective_scan: backend 'cuda' runs only on CUDA tensors; the inputs are on {device_type}"
            )
    if backend == "triton" and (why := triton_scan.unsupported_reason(device_type)) is not None:
        raise BackendUnavailableError(f"selective_scan: backend 'triton' is unavailable: {why}")
    if backend == "cpu" and not cpu_kernel.available():
        why = "it is turned off by ESH_CPU_KERNEL=0" if not cpu_kernel.enabled() else cpu_kernel.build_error()
        raise BackendUnavailableError(f"selective_scan: backend 'cpu' is unavailable: {why}")
    return backend, True


_warned_no_gpu_kernel = False


def _default_backend(device_type: str) -> str:
    """For inputs on ``device_type`` when nothing was asked for: on CUDA mamba_ssm's kernel when its
    extension imports, else Triton, else chunked (with a one-time warning); elsewhere chunked
    (``selective_scan`` then takes the C kernel for CPU inputs it can run)."""
    global _warned_no_gpu_kernel
    if device_type != "cuda":
        return "chunked"
    if mamba_cuda.is_available():
        return "cuda"
    if triton_scan.is_available():
        return "triton"
    if not _warned_no_gpu_kernel:
        _warned_no_gpu_kernel = True
        warnings.warn(
            "selective_scan: no GPU kernel here (neither triton nor mamba_ssm's compiled extension imports), "
            "so CUDA scans run on the chunked PyTorch path, many times slower; pip install triton (CUDA builds "
            "of torch ship it)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "chunked"


def cpu_kernel_is_default(dim: int | None = None, dstate: int | None = None, groups: int = 1) -> bool:
    """Whether calls with no backend asked for (argument, ``use_backend`` or
    ``$ESH_SCAN_BACKEND``) go to the C kernel when it can run their inputs; given ``dim`` and
    ``dstate`` (and the groups of B and C), also whether it runs inputs of those sizes (it then
    takes CPU inputs with input-dependent B and C, for inference and training)."""
    if dim is not None and dstate is not None and cpu_kernel.shape_unsupported_reason(dim, dstate, groups):
        return False
    return _resolve(None, "cpu") == ("chunked", False) and cpu_kernel.available()


_IMPLS = {
    "reference": selective_scan_reference,
    "chunked": selective_scan_chunked,
    "cpu": cpu_kernel.selective_scan_cpu,
    "triton": triton_scan.selective_scan_triton,
    "cuda": mamba_cuda.selective_scan_cuda,
}


def selective_scan(
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
    """Selective scan ``h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]``, ``y[t] = C[t] h[t]``.

    Args:
        u, delta: (batch, dim, L) input and step size.
        A: (dim, N) real state matrix (Mamba: ``-exp(A_log)``).
        B, C: (batch, N, L) or (batch, G, N, L) input-dependent, or (dim, N) constant.
        D: (dim,) skip connection, ``y += D * u``.
        z: (batch, dim, L) gate, ``out = y * silu(z)``.
        delta_bias: (dim,) added to delta before the optional softplus.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state (batch, dim, N).
        backend: ``"reference"``, ``"chunked"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default:
            the fastest that can run the inputs.
        initial_state: (batch, dim, N) state before the first step (default zero), e.g. the
            last state of the previous piece of a sequence; gradients flow to it. Not taken by
            ``"cuda"`` (mamba_ssm's kernel has none).

    Returns:
        ``out`` (batch, dim, L) in the dtype of ``u``, and the last state (float32, or
        float64 for float64 inputs) when ``return_last_state``. Arithmetic is float32 for
        half-precision inputs.
    """
    if torch.compiler.is_compiling():  # one graph node; the backend is picked when the graph runs
        from .compiled import selective_scan_op

        return selective_scan_op(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, initial_state
        )
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name, asked = _resolve(backend, u.device.type)
    if name == "cuda" and (why := mamba_cuda.unsupported_reason(u, delta, B, C, z, initial_state)) is not None:
        if asked:
            raise InputError(
                f"selective_scan backend 'cuda' cannot run these inputs: mamba_ssm's kernel: {why}; leave "
                "backend unset or ask for 'triton' or 'chunked'"
            )
        name = "triton" if triton_scan.is_available() else "chunked"
    if name == "triton" and (why := triton_scan.unsupported_inputs(u, delta, A, B, C, D, z, delta_bias)) is not None:
        if asked:
            raise InputError(f"selective_scan backend 'triton' cannot run these inputs: {why}")
        name = "chunked"
    if (
        not asked
        and name == "chunked"
        and cpu_kernel.unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state) is None
        and cpu_kernel.available()  # checks ESH_CPU_KERNEL; builds on the first eligible call
    ):
        name = "cpu"
    # passed only when given, so stand-ins with the ten-argument signature (esh.info's counter) still work
    extra = {} if initial_state is None else {"initial_state": initial_state}
    return _IMPLS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **extra)
