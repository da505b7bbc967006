"""The selective scan as a sequential loop: the specification every fast path is tested against.

For every batch b, channel d and state index n::

    delta'[t] = softplus(delta[t] + delta_bias)      (bias and softplus optional)
    h[t]      = exp(delta'[t] * A[n]) * h[t-1] + delta'[t] * B[n, t] * u[t]
    y[t]      = sum_n C[n, t] * h[t]  +  D * u[t]
    out[t]    = y[t] * silu(z[t])                    (gate optional)

with h[-1] = ``initial_state`` (zero by default). This is the semantics of mamba_ssm's
``selective_scan_ref`` for real A.
Arithmetic is float32 (float64 for float64 inputs); the output has the input's dtype and
the last state is returned in the arithmetic dtype. Gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import compute_dtype


def expand_bc(t: Tensor, dim: int) -> Tensor:
    """(dim, N) stays; (batch, N, L) and (batch, G, N, L) become (batch, dim, N, L)."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def selective_scan_reference(
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
    dtype_in = u.dtype
    cdtype = compute_dtype(dtype_in)
    batch, dim, seqlen = u.shape
    u = u.to(cdtype)
    delta = delta.to(cdtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(cdtype)
    B = expand_bc(B.to(cdtype), dim)
    C = expand_bc(C.to(cdtype), dim)

    # unbind (not indexing) so that autograd's backward stays linear in L
    B_ts = [B] * seqlen if B.dim() == 2 else B.unbind(-1)  # (dim, N) or (batch, dim, N)
    C_ts = [C] * seqlen if C.dim() == 2 else C.unbind(-1)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(cdtype)
    ys = []
    for dt, u_t, B_t, C_t in zip(delta.unsqueeze(-1).unbind(2), u.unsqueeze(-1).unbind(2), B_ts, C_ts):
        h = torch.exp(dt * A) * h + dt * B_t * u_t  # dt, u_t: (batch, dim, 1)
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(cdtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdtype))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_reference(
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
    """One step of the recurrence above; see ``esh.ops.selective_state_update``."""
    has_heads = state.dim() == 4
    if not has_heads:
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    nheads = state.shape[1]
    cdtype = compute_dtype(x.dtype)
    dt = dt.to(cdtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdtype)
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.to(cdtype).repeat_interleave(nheads // B.shape[1], dim=1)  # (batch, nheads, N)
    C = C.to(cdtype).repeat_interleave(nheads // C.shape[1], dim=1)
    dA = torch.exp(dt[..., None] * A.to(cdtype))  # (batch, nheads, dim, N)
    dBx = dt[..., None] * B[:, :, None, :] * x.to(cdtype)[..., None]
    new_state = state.to(cdtype) * dA + dBx
    state.copy_(new_state)
    out = (new_state * C[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.to(cdtype) * D.to(cdtype)
    if z is not None:
        out = out * F.silu(z.to(cdtype))
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)
