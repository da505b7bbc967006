"""One recurrent step of the selective scan, for token-by-token generation."""

from __future__ import annotations

from torch import Tensor

from . import mamba_cuda
from ._checks import check_same_device
from .reference import selective_state_update_reference


def _expect(name: str, t: Tensor | None, shape: tuple, what: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"selective_state_update: {name} must have shape {what} = {shape}; got {tuple(t.shape)}")


def _check(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    if state.dim() not in (3, 4):
        raise ValueError(
            "selective_state_update: state must be (batch, dim, N) or (batch, nheads, dim, N); "
            f"got {tuple(state.shape)}"
        )
    if state.is_complex() or A.is_complex():
        raise ValueError("selective_state_update: only real state and A are supported")
    if state.dim() == 3:
        batch, dim, n = state.shape
        _expect("x", x, (batch, dim), "(batch, dim)")
        _expect("dt", dt, (batch, dim), "(batch, dim)")
        _expect("A", A, (dim, n), "(dim, N)")
        _expect("B", B, (batch, n), "(batch, N)")
        _expect("C", C, (batch, n), "(batch, N)")
        _expect("z", z, (batch, dim), "(batch, dim)")
        _expect("D", D, (dim,), "(dim,)")
        _expect("dt_bias", dt_bias, (dim,), "(dim,)")
    else:
        batch, heads, dim, n = state.shape
        _expect("x", x, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("dt", dt, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("A", A, (heads, dim, n), "(nheads, dim, N)")
        _expect("z", z, (batch, heads, dim), "(batch, nheads, dim)")
        _expect("D", D, (heads, dim), "(nheads, dim)")
        _expect("dt_bias", dt_bias, (heads, dim), "(nheads, dim)")
        for name, t in (("B", B), ("C", C)):
            if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != n or heads % t.shape[1]:
                raise ValueError(
                    f"selective_state_update: {name} must have shape (batch, ngroups, N) = "
                    f"({batch}, ngroups, {n}) with ngroups dividing nheads={heads}; got {tuple(t.shape)}"
                )
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


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
) -> Tensor:
    """Advance ``state`` by one step in place and return that step's output.

    mamba_ssm's ``selective_state_update`` semantics: ``state`` (batch, dim, N), ``x``, ``dt``
    and ``z`` (batch, dim), ``A`` (dim, N), ``B`` and ``C`` (batch, N), ``D`` and ``dt_bias``
    (dim,); or the multi-head form with an extra ``nheads`` axis after batch and B/C
    (batch, ngroups, N). Feeding a sequence through this step by step gives the output and
    last state of ``selective_scan`` on the whole sequence.
    """
    _check(state, x, dt, A, B, C, D, z, dt_bias)
    if state.is_cuda and mamba_cuda.is_available():
        return mamba_cuda.selective_state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
