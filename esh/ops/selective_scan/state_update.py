"""One recurrent step of the selective scan, for token-by-token generation."""

from __future__ import annotations

import torch
from torch import Tensor

from esh.errors import InputError

from . import mamba_cuda, triton_state_update
from ._checks import check_same_device
from .reference import selective_state_update_reference

BACKENDS = ("reference", "triton", "cuda")
# selective_scan's names (ESH_SCAN_BACKEND, use_backend) for its PyTorch and C paths: the step has one
_SCAN_BACKENDS_AS_REFERENCE = ("chunked", "cpu")


def _expect(name: str, t: Tensor | None, shape: tuple, what: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise InputError(f"selective_state_update: {name} must have shape {what} = {shape}; got {tuple(t.shape)}")


def _check(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices) -> None:
    if state.dim() not in (3, 4):
        raise InputError(
            "selective_state_update: state must be (batch, dim, N) or (batch, nheads, dim, N); "
            f"got {tuple(state.shape)}"
        )
    if state.is_complex() or A.is_complex():
        raise InputError("selective_state_update: only real state and A are supported")
    # with indices, state is a cache of any number of rows and the batch is x's
    batch = state.shape[0] if state_batch_indices is None else (x.shape[0] if x.dim() else 0)
    if state.dim() == 3:
        _, dim, n = state.shape
        _expect("x", x, (batch, dim), "(batch, dim)")
        _expect("dt", dt, (batch, dim), "(batch, dim)")
        _expect("A", A, (dim, n), "(dim, N)")
        _expect("B", B, (batch, n), "(batch, N)")
        _expect("C", C, (batch, n), "(batch, N)")
        _expect("z", z, (batch, dim), "(batch, dim)")
        _expect("D", D, (dim,), "(dim,)")
        _expect("dt_bias", dt_bias, (dim,), "(dim,)")
    else:
        _, heads, dim, n = state.shape
        _expect("x", x, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("dt", dt, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("A", A, (heads, dim, n), "(nheads, dim, N)")
        _expect("z", z, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("D", D, (heads, dim), "(nheads, dim)")
        _expect("dt_bias", dt_bias, (heads, dim), "(nheads, dim)")
        for name, t in (("B", B), ("C", C)):
            if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != n or heads % t.shape[1]:
                raise InputError(
                    f"selective_state_update: {name} must have shape (batch, ngroups, N) = "
                    f"({batch}, ngroups, {n}) with ngroups dividing nheads={heads}; got {tuple(t.shape)}"
                )
    if state_batch_indices is not None:
        _check_indices(state_batch_indices, batch, state.shape[0])
    check_same_device(
        state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state_batch_indices=state_batch_indices
    )


def _check_indices(indices: object, batch: int, cache_rows: int) -> None:
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        what = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise InputError(f"selective_state_update: state_batch_indices must be an int32 or int64 tensor; got {what}")
    _expect("state_batch_indices", indices, (batch,), "(batch,)")
    rows = indices[indices >= 0].sort().values
    if rows.numel() and rows[-1] >= cache_rows:
        raise InputError(
            f"selective_state_update: state_batch_indices must be below state.shape[0] = {cache_rows} "
            f"(negative: padding); got {int(rows[-1])}"
        )
    repeated = rows[1:][rows[1:] == rows[:-1]]
    if repeated.numel():
        raise InputError(
            f"selective_state_update: state_batch_indices names state row {int(repeated[0])} more than once; "
            "each request needs its own row"
        )


def _on_mamba_cuda(state: Tensor) -> bool:
    return state.is_cuda and mamba_cuda.state_update_available()


def _resolve(backend: str | None, state: Tensor, has_D_and_dt_bias: bool = True) -> str:
    """The argument, else ``use_backend``'s, else ``$ESH_SCAN_BACKEND``, else mamba_ssm's kernel
    for CUDA tensors when installed (and given D and dt_bias: it crashes without them), else
    Triton's for CUDA tensors, else the reference step."""
    from . import BackendUnavailableError, _requested_backend  # the package imports this module

    backend, source = _requested_backend(backend)
    if backend is None:
        if _on_mamba_cuda(state) and has_D_and_dt_bias:
            return "cuda"
        return "triton" if state.is_cuda and triton_state_update.is_available() else "reference"
    name = backend.strip().lower()
    if name in _SCAN_BACKENDS_AS_REFERENCE:
        return "reference"
    if name not in BACKENDS:
        raise InputError(
            f"selective_state_update: unknown backend {backend!r} (from {source}); "
            f"expected one of {BACKENDS + _SCAN_BACKENDS_AS_REFERENCE}"
        )
    if name == "cuda" and not mamba_cuda.state_update_available():
        raise BackendUnavailableError(
            "selective_state_update: backend 'cuda' needs the mamba-ssm package; 'triton' and 'reference' need nothing"
        )
    if name == "cuda" and not state.is_cuda:
        raise BackendUnavailableError(
            f"selective_state_update: backend 'cuda' runs only on CUDA tensors; the state is on {state.device.type}"
        )
    if name == "triton" and (why := triton_state_update.unsupported_reason(state.device)) is not None:
        raise BackendUnavailableError(why)
    return name


def selective_state_update(
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
    backend: str | None = None,
) -> Tensor:
    """Advance ``state`` by one step in place and return that step's output.

    mamba_ssm's ``selective_state_update`` semantics: ``state`` (batch, dim, N), ``x``, ``dt``
    and ``z`` (batch, dim), ``A`` (dim, N), ``B`` and ``C`` (batch, N), ``D`` and ``dt_bias``
    (dim,); or the multi-head form with an extra ``nheads`` axis after batch and B/C
    (batch, ngroups, N). Feeding a sequence through this step by step gives the output and
    last state of ``selective_scan`` on the whole sequence.

    ``state_batch_indices`` (batch,) int32 or int64, for continuous batching: ``state`` is then
    a cache of any number of rows, and request ``i`` reads and updates row
    ``state_batch_indices[i]`` in place; rows no request names are left untouched. A negative
    index marks a padding request: its output is zero and no row is read or written. This is
    mamba_ssm 2.3.2's contract (the argument since 2.2.3, negative indices as padding since
    2.2.6.post3). Where mamba_ssm leaves the result undefined (an index past the cache, two
    requests on one row), this raises ``ValueError``; checking the values costs a host sync on
    CUDA. The Triton kernel, and mamba_ssm's from 2.2.6.post3, take the indices themselves;
    otherwise the named rows are gathered, stepped and written back.

    ``backend``: ``"reference"`` (the PyTorch step in ``reference.py``), ``"triton"``
    (``triton_state_update.py``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
    ``"cuda"`` (mamba_ssm's kernel); ``"chunked"`` and ``"cpu"`` mean ``"reference"``. Default:
    ``use_backend``'s, else ``$ESH_SCAN_BACKEND``, else mamba_ssm's kernel for CUDA tensors when
    it is installed, else Triton's for CUDA tensors, else the reference step.
    """
    _check(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    name = _resolve(backend, state, D is not None and dt_bias is not None)
    if name == "triton":
        return triton_state_update.selective_state_update_triton(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices
        )
    # looked up at call time: tests stand a recording fake in for mamba_ssm's kernel
    step = selective_state_update_reference if name == "reference" else mamba_cuda.selective_state_update_cuda
    if state_batch_indices is None:
        return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if name == "cuda" and mamba_cuda.takes_state_batch_indices():
        return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=state_batch_indices)

    live = state_batch_indices >= 0
    out = torch.zeros_like(x)
    if not live.any():
        return out
    rows = state_batch_indices[live].long()
    picked = state.index_select(0, rows)  # a copy: the step runs on it, then it is written back
    out[live] = step(
        picked,
        x[live],
        dt[live],
        A,
        B[live],
        C[live],
        D,
        None if z is None else z[live],
        dt_bias,
        dt_softplus,
    )
    state.index_copy_(0, rows, picked)
    return out
