"""Input validation shared by every selective-scan backend.

The dispatcher validates once, so backends may assume well-formed inputs. Every
error is a ``ValueError`` that names the argument, the shape it should have had
and the shape it had.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from esh.errors import InputError


class ScanShape(NamedTuple):
    batch: int
    dim: int
    seqlen: int
    dstate: int


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise InputError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise InputError(
            f"selective_scan: {name} is complex ({t.dtype}); only real A, B, C are supported "
            "(the real-valued Mamba parameterisation, A = -exp(A_log))"
        )
    if not t.is_floating_point():
        raise InputError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_bc(name: str, t: Tensor, s: ScanShape) -> None:
    """B and C are (dim, N) constant, (batch, N, L) or (batch, G, N, L) input-dependent."""
    expected = (
        f"(dim, N) = ({s.dim}, {s.dstate}), (batch, N, L) = ({s.batch}, {s.dstate}, {s.seqlen}) "
        f"or (batch, G, N, L) = ({s.batch}, G, {s.dstate}, {s.seqlen}) with G dividing dim={s.dim}"
    )
    shape = _shape(t)
    ok = (
        (t.dim() == 2 and shape == (s.dim, s.dstate))
        or (t.dim() == 3 and shape == (s.batch, s.dstate, s.seqlen))
        or (
            t.dim() == 4
            and shape[0] == s.batch
            and shape[2:] == (s.dstate, s.seqlen)
            and shape[1] > 0
            and s.dim % shape[1] == 0
        )
    )
    if not ok:
        raise InputError(f"selective_scan: {name} must have shape {expected}; got {shape}")


def check_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None = None,
) -> ScanShape:
    """Validate the arguments of ``selective_scan`` and return the problem size."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _check_tensor(name, t)
    for name, t in (("D", D), ("z", z), ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None:
            _check_tensor(name, t)

    if u.dim() != 3:
        raise InputError(f"selective_scan: u must have shape (batch, dim, L); got {_shape(u)}")
    batch, dim, seqlen = u.shape
    if seqlen == 0:
        raise InputError("selective_scan: the sequence length L (last dim of u) must be at least 1")
    if _shape(delta) != _shape(u):
        raise InputError(
            f"selective_scan: delta must have the shape of u, (batch, dim, L) = {_shape(u)}; got {_shape(delta)}"
        )
    if A.dim() != 2 or A.shape[0] != dim:
        raise InputError(f"selective_scan: A must have shape (dim, N) = ({dim}, N); got {_shape(A)}")
    s = ScanShape(batch, dim, seqlen, A.shape[1])
    _check_bc("B", B, s)
    _check_bc("C", C, s)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and _shape(t) != (dim,):
            raise InputError(f"selective_scan: {name} must have shape (dim,) = ({dim},); got {_shape(t)}")
    if z is not None and _shape(z) != _shape(u):
        raise InputError(f"selective_scan: z must have the shape of u, (batch, dim, L) = {_shape(u)}; got {_shape(z)}")
    if initial_state is not None and _shape(initial_state) != (batch, dim, s.dstate):
        raise InputError(
            f"selective_scan: initial_state must have shape (batch, dim, N) = ({batch}, {dim}, {s.dstate}); "
            f"got {_shape(initial_state)}"
        )
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    return s


def check_same_device(**tensors: Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise InputError(f"selective_scan: all tensors must be on one device; got {listing}")
    return first


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 arithmetic for half-precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
