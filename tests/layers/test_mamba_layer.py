"""The Mamba layer's sequence-major forward against its channel-major formulation with F.conv1d."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from esh.layers.mamba import Mamba
from esh.ops import selective_scan_reference
from esh.ops.selective_scan import use_backend

pytestmark = pytest.mark.usefixtures("one_thread")


def _channel_major(m, h, mask=None):
    """in_proj transposed to (batch, channels, L), conv1d with padding on both sides cut to L,
    the reference scan (A, D and the step bias in float32, as the layer passes them), out_proj:
    the layer's formulation before it ran sequence-major."""
    seqlen = h.shape[1]
    keep = (lambda t: t) if mask is None else (lambda t: t * mask[:, None, :].to(t.dtype))
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, dim=1)
    x = keep(F.silu(m.conv1d(keep(x))[..., :seqlen]))
    dt, B, C = torch.split(m.x_proj(x.transpose(1, 2)), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    y = selective_scan_reference(
        x, delta, -torch.exp(m.A_log.float()), B.transpose(1, 2), C.transpose(1, 2), m.D.float(),
        z=z, delta_bias=m.dt_proj.bias.float(), delta_softplus=True,
    )  # fmt: skip
    return m.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_and_every_gradient_equal_the_channel_major_formulation(masked, dtype):
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, d_conv=4).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 11, 16, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[False] * 3 + [True] * 8, [True] * 11]) if masked else None
    g = torch.randn(2, 11, 16, dtype=dtype)
    # float64: the layer on the reference scan (the chunked one rounds differently, ~1e-9);
    # float32: on the default backend (the C kernel)
    with use_backend("reference") if dtype == torch.float64 else contextlib.nullcontext():
        got = m(h, mask=mask)
    got_grads = torch.autograd.grad(got, [h, *m.parameters()], g)
    want = _channel_major(m, h, mask)
    want_grads = torch.autograd.grad(want, [h, *m.parameters()], g)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for (name, _), a, e in zip([("input", h), *m.named_parameters()], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, **tol, msg=lambda s, name=name: f"{name}: {s}")
